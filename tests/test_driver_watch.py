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
        monkeypatch.setattr(driver_watch, "_stop", lambda pid, why: stopped.append(pid))
        monkeypatch.setattr(driver_watch, "_driver", None)
        # No watch thread: one that outlived this test would SIGKILL pytest itself once the
        # monkeypatched _stop is restored (it did, in CI at 7d61a80).
        monkeypatch.setattr(driver_watch, "_watch", lambda driver, stop_file: None)
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


def test_a_worker_stops_before_a_save_once_its_driver_is_stopping_the_run(monkeypatch, tmp_path):
    """The driver's stop file (created on SIGINT/SIGTERM, before Ray's slow abort) stops its workers."""
    me = psutil.Process()
    stopped = []
    monkeypatch.setattr(driver_watch, "_stop", lambda pid, why: stopped.append(why))
    monkeypatch.setattr(driver_watch, "_driver", None)
    monkeypatch.setattr(driver_watch, "_watch", lambda driver, stop_file: None)
    monkeypatch.setattr(driver_watch.tempfile, "gettempdir", lambda: str(tmp_path))
    try:
        assert driver_watch.start(driver_watch.env_for_workers()) is True
        driver_watch.ensure_alive()
        with driver_watch.workers_stopping():
            driver_watch.ensure_alive()
        assert stopped == ["is stopping the run"]
        assert list(tmp_path.iterdir()) == []  # a later run in this process is not stopped
    finally:
        monkeypatch.setattr(driver_watch, "_driver", None)
