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
        monkeypatch.setattr(driver_watch, "POLL_S", 3600.0)  # the thread would not see it in time
        env = {driver_watch.ENV: json.dumps({"pid": driver.pid, "host": platform.node(),
                                             "create_time": me.create_time()})}
        assert driver_watch.start(env) is True
        driver_watch.ensure_alive()
        assert stopped == []
        driver.kill()
        driver.wait()
        driver_watch.ensure_alive()
        assert set(stopped) == {driver.pid}  # (the watch thread sleeps an hour: this was ensure_alive)
    finally:
        if driver.poll() is None:
            driver.kill()
        monkeypatch.setattr(driver_watch, "_driver", None)
