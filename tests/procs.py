"""What a CLI run left behind: Ray processes and /tmp/ray session directories of its driver.

A local Ray started by ``ray.init`` names its session ``session_<date>_<driver pid>``, and its
gcs_server, raylet and helpers carry that directory on their command lines; its workers are
children of the raylet, so the driver's process tree holds them all while it runs. These
helpers only look; they never kill anything.
"""

from __future__ import annotations

import glob
import os
import time

import psutil

RAY_TMP = "/tmp/ray"


SUITE_STARTED = time.time()  # imported at collection, before any test starts a driver


def session_dirs(driver_pid: int) -> list[str]:
    """The session directories a driver with this pid made during this test run: a directory left
    hours earlier by another process that had the same pid is not this driver's."""
    found = glob.glob(os.path.join(RAY_TMP, f"session_*_{driver_pid}"))
    return [d for d in found if os.stat(d).st_ctime >= SUITE_STARTED - 1]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def leftovers(driver_pid: int, tree: list[psutil.Process] = (), grace_s: float = 20.0) -> list[str]:
    """Processes of that driver's Ray still alive after ``grace_s``: members of ``tree`` (the
    driver's descendants, captured while it ran; is_running also checks the start time, so a
    reused pid does not count) and any process naming the driver's session directory."""
    marker = f"_{driver_pid}/"
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p in tree if _alive(p)]
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in a or a.endswith(f"_{driver_pid}") for a in (p.info["cmdline"] or [])
                       if "session_" in a):
                    alive.append(p)
            except psutil.Error:
                continue
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    out = []
    for p in alive:
        try:
            out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            continue
    return out
