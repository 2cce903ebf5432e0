"""The next command removes what a driver killed with SIGKILL left in /tmp/ray: its session
directory, and the processes still naming it. Sessions of live drivers, of other programs,
and of a longer name that merely starts the same are left alone. No Ray needed: the
sessions and their processes are stand-ins with the same shape."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import psutil

from orchestrator import session


def _dead_driver() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    created = psutil.Process(proc.pid).create_time()
    proc.wait()
    return {"pid": proc.pid, "host": platform.node(), "create_time": created}


def _session(root, name: str, marker: dict | None):
    d = root / name
    (d / "logs").mkdir(parents=True)
    if marker is not None:
        (d / session.DRIVER_MARKER).write_text(json.dumps(marker))
    return d


def _naming(path) -> subprocess.Popen:  # like a Ray agent: the session dir on its command line
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--session-dir={path}"])


def test_a_dead_drivers_session_and_its_processes_are_removed_and_nothing_else(tmp_path):
    dead = _session(tmp_path, "session_2026_1358", _dead_driver())
    longer = _session(tmp_path, "session_2026_13580", None)  # another program's Ray
    live = _session(tmp_path, "session_2026_live", {"pid": psutil.Process().pid, "host": platform.node(),
                                                     "create_time": psutil.Process().create_time()})
    elsewhere = _session(tmp_path, "session_2026_other_host", {**_dead_driver(), "host": "not-" + platform.node()})
    (tmp_path / "session_latest").symlink_to(dead)
    agent, bystander = _naming(dead / "logs"), _naming(longer)
    try:
        assert session.remove_dead_sessions(tmp_path) == [dead]
        assert agent.wait(timeout=10) is not None  # stopped
        assert bystander.poll() is None  # a name that only starts the same is someone else's
        assert not dead.exists() and not (tmp_path / "session_latest").exists()
        assert longer.exists() and live.exists() and elsewhere.exists()
        assert session.remove_dead_sessions(tmp_path) == []
    finally:
        for p in (agent, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()
