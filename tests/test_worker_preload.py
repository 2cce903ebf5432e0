"""The workers' setup hook (trainer/worker_preload.py): named in every worker's environment
unless the user's job has a hook of its own or switched it off; it imports in a thread and
never fails the process. That it runs in real Ray workers: tests/test_kept_ray.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orchestrator.launch import PRELOAD_ENV, preload_hook_env
from trainer import ray_internals, worker_preload

ROOT = Path(__file__).resolve().parent.parent
HOOK = {ray_internals.WORKER_SETUP_HOOK_ENV: "trainer.worker_preload.start"}


def test_the_workers_get_the_hook_unless_the_job_has_its_own_or_it_is_switched_off():
    assert preload_hook_env({}, environ={}) == HOOK
    assert preload_hook_env(None, environ={PRELOAD_ENV: "1"}) == HOOK
    assert preload_hook_env({}, environ={PRELOAD_ENV: "0"}) == {}
    # One hook per worker: a user's own (as ray.init or ray job submit set it) is never replaced.
    assert preload_hook_env({"worker_process_setup_hook": "mine.setup"}, environ={}) == {}
    assert preload_hook_env({"env_vars": {ray_internals.WORKER_SETUP_HOOK_ENV: "mine.setup"}}, environ={}) == {}


def test_the_hook_returns_at_once_and_imports_in_a_thread():
    code = ("import sys, time; t = time.time(); from trainer import worker_preload as w; w.start(); "
            "assert time.time() - t < 0.5 and 'torch' not in sys.modules, 'the hook imported in the caller'; "
            "[time.sleep(0.1) for _ in range(600) if w.finished_at is None]; "
            "print(w.finished_at is not None and 'trainer.loop' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_a_failing_import_leaves_the_process_alone(monkeypatch):
    monkeypatch.setattr(worker_preload, "MODULES", ("no_such_module_here",))
    monkeypatch.setattr(worker_preload, "finished_at", None)
    worker_preload._import()  # what the thread runs: no exception escapes
    assert worker_preload.finished_at is None
