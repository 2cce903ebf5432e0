"""Round two of breaking the orchestrator as a careless or unlucky user would (issue 18):
a second driver on a live run, a driver killed with SIGKILL, a local Ray's listeners, and a
worker failure that no restart can fix."""

from __future__ import annotations

import ipaddress
import json
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator import launch, preprocess
from orchestrator.plan import PlannedVariant
from tests.conftest import committed_checkpoint, write_config
from tests.procs import leftovers, session_dirs
from trainer import checkpoint, metrics
from trainer.metrics import read_attempts
from trainer.config import ModelConfig, TrainConfig
from trainer.worker_spec import WorkerSpec

pytestmark = pytest.mark.ray

EVERY = 10
RUN = {"train": {"max_steps": 80, "checkpoint_every": EVERY}}


def _start(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _committed(storage: Path) -> str | None:
    return committed_checkpoint(storage)


def _wait_for_commit(storage: Path, proc: subprocess.Popen, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        name = _committed(storage)
        if name:
            return name
        time.sleep(0.05)
    out, err = proc.communicate() if proc.poll() is not None else ("", "")
    raise AssertionError(f"no checkpoint committed in {storage}: {out[-3000:]}{err[-3000:]}")


def _wait_mid_interval(vdir: Path, proc: subprocess.Popen, timeout_s: float = 120) -> int:
    """Wait until rank 0 has logged a step 3-5 steps past a checkpoint, and return it. A save
    begun (the worker found the driver alive) a moment before a SIGKILL may create its directory
    after the kill, which is allowed; killing mid-interval keeps the next save steps away."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        logged = metrics.read_metrics(vdir / metrics.METRICS_FILE)
        if logged and 3 <= logged[-1]["step"] % EVERY <= 5:
            return logged[-1]["step"]
        time.sleep(0.01)
    raise AssertionError(f"no step 3-5 past a checkpoint was logged in {vdir}")


def _attempts(vdir: Path) -> list[dict]:
    return read_attempts(vdir)


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_a_second_resume_of_a_live_run_is_refused_and_the_live_run_finishes_unharmed(tmp_path, cli_env):
    # Long enough to still be running through both refusals (each a new CLI process) on an idle machine.
    steps = 400
    cfg = write_config(tmp_path / "run.yaml", {"train": {"max_steps": steps, "checkpoint_every": EVERY}})
    run_dir = tmp_path / "runs" / "live"
    live = _start(["train", "--config-file", str(cfg), "--output-dir", "runs", "--name", "live"], cli_env, tmp_path)
    try:
        _wait_for_commit(run_dir / "flash" / checkpoint.STORAGE_NAME, live)
        started = time.monotonic()
        second = _start(["train", "--resume", str(run_dir)], cli_env, tmp_path)
        out, err = _finish(second, 120)
        elapsed = time.monotonic() - started
        assert second.returncode == 2, out + err
        assert err.strip() == (f"error: {run_dir}: a live driver (pid {live.pid} on host {platform.node()}, since "
                               + err.split(", since ", 1)[1].strip())
        assert "let it end (or stop it) before resuming" in err and "Traceback" not in out + err
        assert session_dirs(second.pid) == []  # refused before any Ray started
        assert elapsed < 60, f"took {elapsed:.0f} s"
        # A duplicate --name must not recommend --resume on it either.
        assert live.poll() is None, "the live run ended before the duplicate --name was tried"
        dup = _start(["train", "--config-file", str(cfg), "--output-dir", "runs", "--name", "live"], cli_env, tmp_path)
        out, err = _finish(dup, 120)
        assert dup.returncode == 2 and f"a live run (pid {live.pid} on host" in err and "--resume" not in err
        out, err = _finish(live, 400)
    finally:
        if live.poll() is None:
            live.kill()
    assert live.returncode == 0, out + err
    summary = json.loads((run_dir / "summary.json").read_text())
    rec = summary["variants"]["flash"]
    assert summary["run"]["status"] == "succeeded" and summary["run"]["resumes"] == 0  # never resumed
    assert rec["status"] == "succeeded" and rec["restarts"] == 0 and len(_attempts(run_dir / "flash")) == 1
    lines = (run_dir / "flash" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 1))  # one writer, in order


def test_a_driver_killed_with_sigkill_stops_its_workers_and_the_next_command_cleans_up(tmp_path, cli_env):
    """SIGKILL to ``train``: its workers stop within seconds and write no further checkpoint;
    its local Ray listened on loopback only; ``train --resume`` (the next command) removes the
    session directory and Ray processes the dead driver left, is not blocked by its lock, and
    says the step and checkpoint it resumes from instead of replaying old progress."""
    env = {k: v for k, v in cli_env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # the CLI's own default
    cfg = write_config(tmp_path / "run.yaml", RUN)
    run_dir = tmp_path / "runs" / "r"
    vdir = run_dir / "flash"
    storage = vdir / checkpoint.STORAGE_NAME
    driver = _start(["train", "--config-file", str(cfg), "--output-dir", "runs", "--name", "r"], env, tmp_path)
    try:
        _wait_for_commit(storage, driver)
        tree = psutil.Process(driver.pid).children(recursive=True)
        pids = {driver.pid} | {p.pid for p in tree}
        listeners = {(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.pid in pids and c.status == psutil.CONN_LISTEN}
        workers = _attempts(vdir)[-1]["pids"]
        _wait_mid_interval(vdir, driver)  # no save is in flight: one begun just before the kill may land after any listing
        before = {p.name for p in checkpoint.checkpoint_dirs(storage)}
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed_at = time.monotonic()
    finally:
        if driver.poll() is None:
            driver.kill()
    # Everything Ray started listens on loopback. The one exception is torch.distributed's
    # rendezvous store, which Ray Train opens in rank 0 and which torch binds to every
    # interface with no setting to change it: at most one port, in rank 0's process.
    open_ = [(pid, ip, port) for pid, ip, port in listeners if not _is_loopback(ip)]
    assert len(listeners) > 10 and [pid for pid, _, _ in open_] in ([], [workers[0]]), (open_, listeners)
    while any(psutil.pid_exists(p) for p in workers) and time.monotonic() - killed_at < 30:
        time.sleep(0.1)
    stopped_s = time.monotonic() - killed_at
    assert stopped_s < 5, f"workers ran on for {stopped_s:.1f} s after the driver died"
    assert {p.name for p in checkpoint.checkpoint_dirs(storage)} <= before  # none written after the kill
    [dead_session] = session_dirs(driver.pid)

    resume = _start(["train", "--resume", str(run_dir)], cli_env, tmp_path)
    out, err = _finish(resume, 400)
    assert resume.returncode == 0, out + err
    assert f"left by a driver (pid {driver.pid}) that was killed" in out
    assert not Path(dead_session).exists() and leftovers(driver.pid, tree, grace_s=0) == []
    start = _attempts(vdir)[-1]
    name = Path(start["restored_from"]).name
    assert f"[flash] resuming at step {start['start_step']} from {name}" in out
    assert f"step {start['start_step']}/80 " not in out and "step 1/80 " not in out  # no replay of old lines
    assert f"step {start['start_step'] + 1}/80 " in out and "step 80/80 " in out
    assert leftovers(resume.pid) == [] and session_dirs(resume.pid) == []


def test_an_allocation_that_cannot_fit_fails_once_without_restarts(ray_session, tmp_path):
    """A batch whose activations need ~100 GB: the worker's "can't allocate memory" is
    classified deterministic and the variant fails at once (restarts 0) despite max_failures 3.
    Launched directly, as the plan's memory estimate would refuse this config before launch."""
    spec = WorkerSpec(variant="oom", model=ModelConfig(dim=1024, n_layers=1, n_heads=8, n_kv_heads=2),
                      train=TrainConfig(seq_len=128, micro_batch_size=200_000, max_steps=2, compile=False),
                      data_path=str(preprocess.embedded_dataset()), out_dir=str(tmp_path / "oom"))
    v = PlannedVariant(name="oom", attention="standard", env={"ATTN_IMPL": "standard"}, num_workers=1,
                       use_gpu=False, cpus_per_worker=1)
    rec = launch.run_variant(v, spec, max_failures=3, keep_checkpoints=2).model_dump()
    assert rec["status"] == "failed" and rec["restarts"] == 0 and rec["failure_kind"] == "out_of_memory", rec
    assert rec["error"].startswith("out of memory: RuntimeError: ") and "can't allocate memory" in rec["error"]
    assert rec["error"].endswith("(not retried: a restart would fail the same way)")
    assert len(_attempts(tmp_path / "oom")) == 1
