"""Faults a run survives: a worker SIGKILLed mid-run, SIGINT/SIGTERM to the driver, then --resume.

Each compares with one uninterrupted run of the same config and seed: batches are a pure
function of (seed, step, rank) and the checkpoint restores model, optimizer, schedule and RNG,
so a run that resumes correctly reproduces the uninterrupted losses (to float tolerance).
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

import psutil
import pytest

from orchestrator.errors import Interrupted
from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from tests.procs import leftovers, session_dirs
from trainer import checkpoint
from trainer.metrics import read_attempts, read_metrics

pytestmark = pytest.mark.ray

EVERY = 3
LONG = {"train": {"max_steps": 24, "checkpoint_every": EVERY}}


def _train(tmp_path, name, overrides=LONG, **opts):
    cfg = write_config(tmp_path / f"{name}.yaml", overrides)
    return train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name, **opts))


def committed_step(storage: Path) -> int:
    """The step of Ray's latest registered checkpoint (0 if none yet)."""
    try:
        snap = json.loads((storage / checkpoint.SNAPSHOT_FILE).read_text())
        return int(snap["latest_checkpoint_result"]["checkpoint_dir_name"].rsplit("_", 1)[1])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def wait_for_commit(storage: Path, step: int, timeout_s: float = 300, proc=None) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = committed_step(storage)
        if got >= step:
            return got
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint >= step {step} committed in {storage}")


def last_step(metrics: Path) -> int:
    recs = read_metrics(metrics)
    return recs[-1]["step"] if recs else 0


def attempts(vdir: Path) -> list[dict]:
    return read_attempts(vdir)


@pytest.fixture(scope="module")
def clean_run(ray_session, tmp_path_factory):
    """The uninterrupted reference: LONG with the default seed."""
    tmp = tmp_path_factory.mktemp("clean")
    rec = _train(tmp, "clean").variants["flash"]
    assert rec.status == "succeeded" and rec.restarts == 0
    return read_metrics(tmp / "runs" / "clean" / "flash" / "metrics.jsonl")


def assert_matches_clean(metrics: Path, clean: list[dict]) -> None:
    got = read_metrics(metrics)
    assert [r["step"] for r in got] == list(range(1, LONG["train"]["max_steps"] + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in clean], rel=1e-5)


def test_a_worker_killed_with_sigkill_resumes_losing_at_most_one_interval(ray_session, tmp_path, clean_run):
    """A real SIGKILL to rank 1's RayTrainWorker process, once a checkpoint is committed."""
    vdir = tmp_path / "runs" / "killed" / "flash"
    seen: dict = {}

    def kill_rank_1():
        try:
            seen["committed"] = wait_for_commit(vdir / checkpoint.STORAGE_NAME, EVERY)
            seen["reached"] = last_step(vdir / "metrics.jsonl")
            pid = attempts(vdir)[-1]["pids"][1]
            seen["name"] = psutil.Process(pid).name()
            if "RayTrainWorker" in seen["name"]:  # never kill anything but the run's own worker
                os.kill(pid, signal.SIGKILL)
        except BaseException as e:  # reported by the asserts below
            seen["error"] = repr(e)

    killer = threading.Thread(target=kill_rank_1)
    killer.start()
    rec = _train(tmp_path, "killed").variants["flash"]
    killer.join()
    assert "error" not in seen and "RayTrainWorker" in seen["name"], seen
    assert rec.status == "succeeded" and rec.restarts == 1, rec
    resumed_at = attempts(vdir)[-1]["start_step"]
    assert resumed_at >= seen["committed"]  # nothing committed is lost
    assert seen["reached"] - resumed_at <= EVERY  # at most one checkpoint interval is redone
    assert_matches_clean(vdir / "metrics.jsonl", clean_run)
    assert rec.final_loss == pytest.approx(clean_run[-1]["loss"], rel=1e-5)
    assert all(checkpoint.verifies(d) for d in checkpoint.checkpoint_dirs(vdir / checkpoint.STORAGE_NAME))


def test_sigint_to_the_driver_stops_the_workers_and_keeps_a_usable_checkpoint(ray_session, tmp_path):
    """Ctrl-C while train() runs in this process: Interrupted (exit code 130), an
    "interrupted" summary, the workers gone, and a checkpoint that verifies."""
    vdir = tmp_path / "runs" / "ctrl-c" / "flash"
    pids: list[int] = []

    def ctrl_c():
        wait_for_commit(vdir / checkpoint.STORAGE_NAME, EVERY, timeout_s=300)
        pids.extend(attempts(vdir)[-1]["pids"])
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    # Long enough that the signal always lands while train() runs (and handles it).
    with pytest.raises(Interrupted) as e:
        _train(tmp_path, "ctrl-c", {"train": {"max_steps": 500, "checkpoint_every": EVERY}})
    assert e.value.exit_code == 130 and e.value.run_dir == tmp_path / "runs" / "ctrl-c"
    summary = json.loads((tmp_path / "runs" / "ctrl-c" / "summary.json").read_text())
    assert summary["run"]["status"] == "interrupted"
    assert summary["variants"]["flash"]["status"] == "interrupted"
    assert summary["variants"]["flash"]["error"] == "interrupted by SIGINT"
    assert checkpoint.newest_usable(vdir / checkpoint.STORAGE_NAME) is not None
    deadline = time.monotonic() + 30
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if psutil.pid_exists(p)], "workers still running after the interrupt"
    assert signal.getsignal(signal.SIGINT) is not None  # handlers restored after train()


def _start_cli(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_sigterm_to_the_cli_leaves_a_run_that_resume_completes(tmp_path, cli_env, clean_run):
    """SIGTERM to ``python -m orchestrator train``: exit 143, workers and the local Ray gone,
    its /tmp/ray session removed; ``train --resume`` then finishes the same run, Ray restoring
    its checkpoint list from storage, with the losses of an uninterrupted run."""
    cfg = write_config(tmp_path / "long.yaml", LONG)
    run_dir = tmp_path / "runs" / "r"
    vdir = run_dir / "flash"
    proc = _start_cli(["train", "--config-file", str(cfg), "--output-dir", "runs", "--name", "r"], cli_env, tmp_path)
    try:
        wait_for_commit(vdir / checkpoint.STORAGE_NAME, EVERY, proc=proc)
        tree = _descendants(proc.pid)
        assert any("raylet" in p.name() for p in tree)  # the local Ray this command started
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out + err
    assert err.strip().splitlines()[-1] == (f"error: interrupted by SIGTERM; continue it with: "
                                            f"python -m orchestrator train --resume {Path('runs') / 'r'}")
    assert "Traceback" not in err
    assert leftovers(proc.pid, tree) == []
    assert session_dirs(proc.pid) == []
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["status"] == "interrupted" and summary["variants"]["flash"]["status"] == "interrupted"
    assert all(checkpoint.verifies(d) for d in checkpoint.checkpoint_dirs(vdir / checkpoint.STORAGE_NAME))

    resume = _start_cli(["train", "--resume", str(run_dir)], cli_env, tmp_path)
    try:
        out, err = resume.communicate(timeout=400)
    finally:
        if resume.poll() is None:
            resume.kill()
    assert resume.returncode == 0, out + err
    assert f"resuming run directory: {run_dir}" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    rec = summary["variants"]["flash"]
    assert summary["run"]["status"] == "succeeded" and summary["run"]["resumes"] == 1
    assert rec["status"] == "succeeded" and rec["steps"] == LONG["train"]["max_steps"] and rec["restarts"] == 0
    resumed = attempts(vdir)[-1]
    assert resumed["ray_checkpoint"] is not None  # Ray restored its snapshot from the same storage
    assert resumed["start_step"] >= EVERY and rec["restored_from"] == resumed["restored_from"]
    assert_matches_clean(vdir / "metrics.jsonl", clean_run)
    assert leftovers(resume.pid) == [] and session_dirs(resume.pid) == []
    # Resuming a finished run does nothing and touches nothing.
    before = (run_dir / "summary.json").read_bytes()
    again = _start_cli(["train", "--resume", str(run_dir)], cli_env, tmp_path)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and "nothing to resume" in out, out + err
    assert (run_dir / "summary.json").read_bytes() == before


def test_a_failed_run_says_how_to_resume_and_resume_completes_it(tmp_path, cli_env, clean_run):
    """A worker dies with no restarts allowed (max_failures 0): exit 1, one line naming the run's
    summary and the --resume command; that command then finishes the run from its checkpoint."""
    cfg = write_config(tmp_path / "fails.yaml", {
        "train": {**LONG["train"], "fault": {"rank": 1, "step": EVERY + 2}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0}})
    run_dir = (tmp_path / "runs" / "f").resolve()
    failed = _start_cli(["train", "--config-file", str(cfg), "--output-dir", "runs", "--name", "f"], cli_env, tmp_path)
    out, err = failed.communicate(timeout=300)
    assert failed.returncode == 1, out + err
    assert err.strip().splitlines()[-1] == (
        f"error: a variant failed; see {run_dir}/summary.json. Once the cause is fixed, continue from its last "
        f"checkpoint with: python -m orchestrator train --resume {run_dir}")
    rec = json.loads((run_dir / "summary.json").read_text())["variants"]["flash"]
    assert rec["status"] == "failed" and "worker process has died" in rec["error"]
    assert rec["error"].endswith("(gave up after 0 restart(s): scaling.max_failures is 0)")
    assert leftovers(failed.pid) == [] and session_dirs(failed.pid) == []

    resume = _start_cli(["train", "--resume", str(run_dir)], cli_env, tmp_path)
    out, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, out + err
    rec = json.loads((run_dir / "summary.json").read_text())["variants"]["flash"]
    assert rec["status"] == "succeeded" and rec["start_step"] == EVERY
    assert_matches_clean(run_dir / "flash" / "metrics.jsonl", clean_run)


def test_ctrl_c_to_the_cli_stops_the_workers_in_seconds_and_names_the_checkpoint_resume_uses(tmp_path, cli_env):
    """SIGINT to ``python -m orchestrator train``: exit 130 well before a process manager's
    SIGKILL (10 s), no step trained a second after the driver began to stop the workers, and the
    checkpoint the console names is the one ``--resume`` then restores (it was 14-16 s, 6-8 more
    steps and a checkpoint line that --resume contradicted)."""
    cfg = write_config(tmp_path / "long.yaml", {"train": {"max_steps": 500, "checkpoint_every": EVERY}})
    run_dir = tmp_path / "runs" / "c"
    vdir = run_dir / "flash"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", "--config-file", str(cfg),
                             "--output-dir", "runs", "--name", "c"], env=cli_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []  # (when read, line): when the driver said it stops the workers
    reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for_commit(vdir / checkpoint.STORAGE_NAME, 2 * EVERY, proc=proc)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
        took = time.monotonic() - signalled
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(line for _, line in lines)
    assert proc.returncode == 130, out
    assert took < 8, f"exit {took:.1f} s after SIGINT"
    stopping = next(t for t, line in lines if "stopping the workers" in line)
    assert (vdir / "metrics.jsonl").stat().st_mtime < stopping + 1.0, "steps trained on after the stop"
    named = [line.split("--resume continues from ")[1].strip() for _, line in lines if "--resume continues from " in line]
    assert len(named) == 1, out

    resume = _start_cli(["train", "--resume", str(run_dir)], cli_env, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while len(attempts(vdir)) < 2 and resume.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        resume.send_signal(signal.SIGINT)
        out, err = resume.communicate(timeout=180)
    finally:
        if resume.poll() is None:
            resume.kill()
    assert resume.returncode == 130, out + err
    assert Path(attempts(vdir)[-1]["restored_from"]).name == named[0]


SLOW_CLEANUP = """
import os, signal, sys, time
from orchestrator import interrupt, session
from orchestrator.errors import Interrupted
try:
    with interrupt.handle_signals(), session.ray_session(None, num_cpus=1):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
except Interrupted as e:
    time.sleep(4)  # a driver stopping its workers and writing its summary: longer than Ray's 3 s alarm
    print("stopped cleanly", flush=True)
    sys.exit(e.exit_code)
"""


def test_a_driver_whose_cleanup_after_sigterm_takes_seconds_still_exits_143(tmp_path, cli_env):
    """ray.init installs Ray's C++ failure signal handler in the driver, which on SIGTERM also set
    a 3 s alarm that aborted the driver (exit -6) in the middle of a longer cleanup."""
    proc = subprocess.run([sys.executable, "-c", SLOW_CLEANUP], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert (proc.returncode, proc.stdout) == (143, "stopped cleanly\n"), proc.stderr
