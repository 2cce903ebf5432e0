"""The probe as a child process: its command line, running it with a timeout, reading its output.

``run_probe`` runs on the node (inside a Ray task, or locally); ``parse_probe`` runs in the
driver and is pure, so a crash, a hang or garbage output is classified the same way everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from orchestrator.preflight.probe import MARKER, SCHEMA, tail
from orchestrator.preflight.rules import Cause, Issue, classify, crash_cause
from orchestrator.preflight.settings import ProbeSettings
from trainer.attention import registry

PYTHON = "python"  # replaced by the node's own interpreter in run_probe
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # holds orchestrator/ and trainer/


def probe_command(settings: ProbeSettings) -> list[str]:
    return [PYTHON, "-m", "orchestrator.preflight.probe", "--shape", settings.shape.to_json(),
            "--import-timeout", str(settings.import_timeout_s)] + (["--disable-flash-attn"] if settings.disable_flash_attn
                                                                   else [])


def probe_env(disable_flash_attn: bool, base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    # The child must find our packages even when this worker found them some other way.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    registry.enable_fa4_disk_cache(env)  # FA4's JIT kernels kept on disk for the next probe and the workers
    if disable_flash_attn:
        env["DISABLE_FLASH_ATTN"] = "1"  # the child's `import trainer` installs the import guard first
    if env.get("CUDA_VISIBLE_DEVICES") == "":
        # A zero-GPU Ray task may get an empty mask; the probe must see the node's GPUs.
        del env["CUDA_VISIBLE_DEVICES"]
    return env


def run_probe(argv: list[str], timeout_s: float, env: Optional[dict] = None,
              on_facts: Optional[Callable[[str], None]] = None) -> dict:
    """Run the probe command; never raises, never outlives ``timeout_s`` (its children neither).
    ``on_facts(line)`` is called with each facts line as the probe prints it: the first may come
    before the kernels are timed (``probe.DEFERRED``), so the caller can go on while they are."""
    argv = [sys.executable if a == PYTHON else a for a in argv]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group, so a timeout kills it all
    except OSError as e:
        return {"returncode": None, "stdout": "", "stderr": f"{type(e).__name__}: {e}", "timed_out": False,
                "seconds": 0.0}
    if on_facts is not None:
        stdout, stderr, timed_out = _stream(proc, timeout_s, on_facts)
    else:
        timed_out = False
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            stdout, stderr = proc.communicate()
    return {"returncode": proc.returncode, "stdout": stdout, "stderr": stderr, "timed_out": timed_out,
            "seconds": round(time.monotonic() - started, 3)}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stream(proc: subprocess.Popen, timeout_s: float, on_facts: Callable[[str], None]) -> tuple[str, str, bool]:
    """(stdout, stderr, timed out): ``communicate`` with stdout read line by line, each facts
    line handed to ``on_facts`` as it comes."""
    out: list[str] = []
    err: list[str] = []

    def read_stdout() -> None:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(MARKER):
                try:
                    on_facts(line)
                except Exception:  # noqa: BLE001 - a failing listener must not lose the probe's output
                    pass

    readers = [threading.Thread(target=read_stdout, name="probe-stdout", daemon=True),
               threading.Thread(target=lambda: err.append(proc.stderr.read()), name="probe-stderr", daemon=True)]
    for r in readers:
        r.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait()
    for r in readers:
        r.join()
    proc.stdout.close()
    proc.stderr.close()
    return "".join(out), "".join(err), timed_out


def parse_probe(raw: dict, timeout_s: float) -> tuple[Optional[dict], Optional[Issue]]:
    """(facts, None) for a good probe; (None, issue) for one that crashed, hung or printed garbage."""
    what = "the probe"
    if raw.get("timed_out"):
        return None, Issue("probe", crash_cause(f"{what} ({timeout_s:g} s timeout)", None, True), tail(raw.get("stderr") or ""))
    rc = raw.get("returncode")
    if rc != 0:  # None too: the probe did not start
        stderr = tail(raw.get("stderr") or "")
        if rc is not None and rc < 0:
            cause = crash_cause(what, signal.Signals(-rc).name, False)
        else:
            # A Python error in the probe (torch failing to import, say) has a classifiable text.
            found = classify(stderr)
            cause = Cause("probe_crashed", f"{what} exited with code {rc}"
                          + (f": {found.summary}" if found.code != "unknown" else ""),
                          found.hint if found.code != "unknown" else "run the probe by hand on the node: "
                          "python -m orchestrator.preflight.probe")
        return None, Issue("probe", cause, stderr)
    lines = [l for l in (raw.get("stdout") or "").splitlines() if l.startswith(MARKER)]
    try:
        facts = json.loads(lines[-1][len(MARKER):]) if lines else None
    except ValueError:
        facts = None
    if not isinstance(facts, dict) or facts.get("schema") != SCHEMA:
        out = tail(raw.get("stdout") or "", 5)
        return None, Issue("probe", Cause("probe_garbage", f"{what} returned no readable facts",
                                          "the probe and the driver may run different versions of this package; "
                                          "install the same version on every node"), out or "(no output)")
    return facts, None
