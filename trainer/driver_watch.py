"""Workers end when the driver that launched them is gone.

A driver killed with SIGKILL takes the local Ray's GCS and raylet with it, but nothing tells
its training workers: they trained on and wrote checkpoints nobody would register. The driver
names itself in each worker's environment; a worker on the driver's host checks every
``POLL_S`` that this very process (pid and start time) still runs, and ends itself at once
when it does not. Workers on other hosts need no watch: a cluster's GCS outlives the driver
and ends the dead job's workers itself.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import threading
import time

import psutil

log = logging.getLogger(__name__)

ENV = "ORCHESTRATOR_DRIVER"
POLL_S = 0.2


def env_for_workers() -> dict[str, str]:
    """The worker environment entry that names this process as the driver."""
    me = psutil.Process()
    return {ENV: json.dumps({"pid": me.pid, "host": platform.node(), "create_time": me.create_time()})}


def _alive(driver: psutil.Process) -> bool:
    try:
        return driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE  # is_running checks start time
    except psutil.Error:
        return False


def _watch(driver: psutil.Process) -> None:
    while _alive(driver):
        time.sleep(POLL_S)
    _stop(driver.pid)


def _stop(driver_pid: int) -> None:
    log.error("the driver (pid %d) is gone: this worker stops now", driver_pid)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: anything written now would belong to no run


_driver: psutil.Process | None = None  # the watched driver, once start() began watching it


def ensure_alive() -> None:
    """Stop this worker now if the watched driver is gone. Called before a checkpoint is begun:
    the watch thread polls every POLL_S, and on a loaded machine may run later still, while a
    save begun after the driver died would write a checkpoint that belongs to no run."""
    if _driver is not None and not _alive(_driver):
        _stop(_driver.pid)


def start(environ=None) -> bool:
    """Start the watch in this worker (once per process); False when there is nothing to watch."""
    global _driver
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
    threading.Thread(target=_watch, args=(driver,), name="driver-watch", daemon=True).start()
    _driver = driver
    return True
