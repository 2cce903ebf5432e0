"""Workers end when the driver that launched them is gone, or is stopping the run.

A driver killed with SIGKILL takes the local Ray's GCS and raylet with it, but nothing tells
its training workers: they trained on and wrote checkpoints nobody would register. The driver
names itself in each worker's environment; a worker on the driver's host checks every
``POLL_S`` that this very process (pid and start time) still runs, and ends itself at once
when it does not. Workers on other hosts need no watch: a cluster's GCS outlives the driver
and ends the dead job's workers itself.

A driver stopped by SIGINT/SIGTERM creates its stop file (named in the same entry) before it
asks Ray Train to abort: that abort takes Ray 10 s and more, during which the workers would
train on and write checkpoints past ``keep_checkpoints`` that no one registers.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

log = logging.getLogger(__name__)

ENV = "ORCHESTRATOR_DRIVER"
POLL_S = 0.2


def _stop_file(me: psutil.Process) -> Path:
    return Path(tempfile.gettempdir()) / f"orchestrator-driver-{me.pid}-{me.create_time():.0f}.stop"


def env_for_workers() -> dict[str, str]:
    """The worker environment entry that names this process as the driver."""
    me = psutil.Process()
    return {ENV: json.dumps({"pid": me.pid, "host": platform.node(), "create_time": me.create_time(),
                             "stop_file": str(_stop_file(me))})}


@contextmanager
def workers_stopping() -> Iterator[None]:
    """For the length of the block, this driver's workers on its host stop within ``POLL_S``."""
    stop = _stop_file(psutil.Process())
    stop.touch()
    try:
        yield
    finally:
        stop.unlink(missing_ok=True)  # a later run in this process must not stop at once


def _alive(driver: psutil.Process) -> bool:
    try:
        return driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE  # is_running checks start time
    except psutil.Error:
        return False


def _why_stop(driver: psutil.Process, stop_file: str | None) -> str | None:
    if not _alive(driver):
        return "is gone"
    if stop_file and os.path.exists(stop_file):
        return "is stopping the run"
    return None


def _watch(driver: psutil.Process, stop_file: str | None) -> None:
    while (why := _why_stop(driver, stop_file)) is None:
        time.sleep(POLL_S)
    _stop(driver.pid, why)


def _stop(driver_pid: int, why: str = "is gone") -> None:
    log.error("the driver (pid %d) %s: this worker stops now", driver_pid, why)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: anything written now would belong to no run


_driver: psutil.Process | None = None  # the watched driver, once start() began watching it
_stop_path: str | None = None  # its stop file


def ensure_alive() -> None:
    """Stop this worker now if the watched driver is gone or stopping. Called before a checkpoint
    is begun: the watch thread polls every POLL_S, and on a loaded machine may run later still,
    while a save begun after the driver died would write a checkpoint that belongs to no run."""
    if _driver is not None and (why := _why_stop(_driver, _stop_path)) is not None:
        _stop(_driver.pid, why)


def start(environ=None) -> bool:
    """Start the watch in this worker (once per process); False when there is nothing to watch."""
    global _driver, _stop_path
    raw = (os.environ if environ is None else environ).get(ENV)
    if _driver is not None or not raw:
        return False
    try:
        me = json.loads(raw)
        if me["host"] != platform.node():
            return False
        driver = psutil.Process(int(me["pid"]))
        if abs(driver.create_time() - float(me["create_time"])) > 1.0:
            raise psutil.NoSuchProcess(int(me["pid"]))  # the pid now belongs to another process
    except psutil.NoSuchProcess:
        _stop(int(me["pid"]))
        return True
    except (ValueError, KeyError, TypeError):
        log.warning("%s=%r: not understood; not watching the driver", ENV, raw)
        return False
    stop_file = me.get("stop_file")
    threading.Thread(target=_watch, args=(driver, stop_file), name="driver-watch", daemon=True).start()
    _driver, _stop_path = driver, stop_file
    return True
