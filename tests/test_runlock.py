"""One driver per run directory: a second driver is refused naming the first; a killed
driver's lock does not block. The holder is a real second process, as another driver is."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys

import pytest

from orchestrator import rundir, runlock
from tests.conftest import ROOT

HOLD = """
import sys, time
from pathlib import Path
from orchestrator import runlock
with runlock.scope():
    runlock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder_proc(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield run, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_driver_is_refused_naming_the_live_ones_pid_and_host(holder_proc):
    run, proc = holder_proc
    live = runlock.holder(run)
    assert live is not None and (live.pid, live.host) == (proc.pid, platform.node())
    with runlock.scope(), pytest.raises(runlock.RunInUse) as e:
        runlock.acquire(run)
    assert e.value.exit_code == 2
    assert f"a live driver (pid {proc.pid} on host {platform.node()}, since " in str(e.value)


def test_a_duplicate_name_of_a_live_run_does_not_recommend_resume(holder_proc):
    run, proc = holder_proc
    for refuse in (lambda: rundir.check_new(run.parent, "r"), lambda: rundir.create(run.parent, "r")):
        with pytest.raises(runlock.UsageError) as e:
            refuse()
        assert f"a live run (pid {proc.pid} on host" in str(e.value) and "--resume" not in str(e.value)


def test_a_killed_drivers_lock_does_not_block(holder_proc):
    run, proc = holder_proc
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert runlock.holder(run) is None
    with runlock.scope():
        runlock.acquire(run)
        assert runlock.holder(run).pid == os.getpid()
    with pytest.raises(runlock.UsageError, match="use --resume"):  # not live: resuming is the advice
        rundir.check_new(run.parent, "r")


def test_a_lock_is_released_when_its_scope_ends(tmp_path):
    with runlock.scope():
        runlock.acquire(tmp_path)
        # This process holds it; another open of the file cannot lock it (flock is per open file).
        assert runlock.holder(tmp_path).pid == os.getpid()
    assert runlock.holder(tmp_path) is None
    with runlock.scope():
        runlock.acquire(tmp_path)  # and can be taken again
