"""A worker checks its driver before it begins a checkpoint, not only in the watch thread."""

import json
import platform
import subprocess
import sys

import psutil

from trainer import driver_watch


def test_a_save_begun_after_the_driver_died_stops_the_worker_first(monkeypatch):
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = psutil.Process(driver.pid)
        stopped = []
        monkeypatch.setattr(driver_watch, "_stop", stopped.append)
        monkeypatch.setattr(driver_watch, "_driver", None)
        # No watch thread: one that outlived this test would SIGKILL pytest itself once the
        # monkeypatched _stop is restored (it did, in CI at 7d61a80).
        monkeypatch.setattr(driver_watch, "_watch", lambda driver: None)
        env = {driver_watch.ENV: json.dumps({"pid": driver.pid, "host": platform.node(),
                                             "create_time": me.create_time()})}
        assert driver_watch.start(env) is True
        driver_watch.ensure_alive()
        assert stopped == []
        driver.kill()
        driver.wait()
        driver_watch.ensure_alive()
        assert stopped == [driver.pid]  # there is no watch thread: this was ensure_alive
    finally:
        if driver.poll() is None:
            driver.kill()
        monkeypatch.setattr(driver_watch, "_driver", None)
