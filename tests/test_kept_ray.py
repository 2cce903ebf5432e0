"""The warm mode: ``train --keep-ray`` starts a local Ray that outlives the command, the next one
joins it, ``ray-down`` stops exactly it; and the local probe runs while Ray starts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from orchestrator import kept_ray, ray_token
from orchestrator.errors import UsageError
from orchestrator.run import TrainOptions, prepare
from orchestrator.session import remove_dead_sessions
from tests.conftest import ROOT, run_cli, write_config


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv(kept_ray.STATE_DIR_ENV, str(tmp_path / "state"))
    return tmp_path / "state"


def _record(state: Path, pid: int, create_time: float, session_dir: str | None = None) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = kept_ray._path("json")
    path.write_text(json.dumps({"pid": pid, "create_time": create_time, "address": "127.0.0.1:1",
                                "started": "then", "session_dir": session_dir}))
    return path


def _fake_head() -> subprocess.Popen:
    """A process group like a kept head's: a leader in a session of its own, with a child."""
    return subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                             "subprocess.Popen(['sleep', '600']); time.sleep(600)"], start_new_session=True)


def test_a_record_of_a_kept_head_that_is_gone_is_ignored_with_a_warning_and_removed(state, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    path = _record(state, gone.pid, time.time())
    with caplog.at_level(logging.WARNING, logger="orchestrator.kept_ray"):
        assert kept_ray.find() is None
    assert "is gone" in caplog.text and f"pid {gone.pid}" in caplog.text
    assert not path.exists()


def test_a_live_process_that_reused_the_recorded_pid_is_not_taken_for_the_head(state):
    me = psutil.Process()
    path = _record(state, me.pid, me.create_time() - 3600)  # this pid, started an hour earlier: another process
    assert kept_ray.find() is None and not path.exists()
    _record(state, me.pid, me.create_time())
    assert kept_ray.find().pid == me.pid


def test_ray_down_stops_the_recorded_process_group_and_removes_its_session_and_record(state, tmp_path):
    head = _fake_head()
    threading.Thread(target=head.wait, daemon=True).start()  # its parent reaps it, as init reaps a real head
    try:
        leader = psutil.Process(head.pid)
        deadline = time.time() + 30
        while not leader.children() and time.time() < deadline:
            time.sleep(0.05)
        child = leader.children()[0]
        session = tmp_path / "ray" / "session_x"
        session.mkdir(parents=True)
        (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # what `ray start --head` leaves
        path = _record(state, head.pid, leader.create_time(), str(session))
        stopped = kept_ray.down()
        assert stopped is not None and stopped.pid == head.pid
        assert head.wait(timeout=10) is not None
        child.wait(timeout=10)
        assert not child.is_running()
        assert not session.exists() and not path.exists()
        assert not (tmp_path / "ray" / "ray_current_cluster").exists()  # a later ray.init() would try the stopped head
        assert kept_ray.down() is None  # nothing kept any more
    finally:
        if head.poll() is None:
            os.killpg(head.pid, 9)


def test_the_ray_token_is_made_readable_by_its_user_only(tmp_path):
    """Ray's own writes 0644 in a 0755 directory, which another user read and joined with (issue 32)."""
    old = os.umask(0o022)
    try:
        env = {ray_token.TOKEN_PATH_ENV: str(tmp_path / "ray" / "auth_token")}
        ray_token.ensure_private(env)
        made = tmp_path / "ray" / "auth_token"
        assert os.stat(made).st_mode & 0o777 == 0o600 and os.stat(made.parent).st_mode & 0o777 == 0o700
        assert len(made.read_text()) == 64
        # One made earlier with the umask's mode (as Ray makes it): tightened, kept as it is.
        made.chmod(0o644)
        before = made.read_text()
        ray_token.ensure_private(env)
        assert os.stat(made).st_mode & 0o777 == 0o600 and made.read_text() == before
    finally:
        os.umask(old)


def test_the_kept_heads_state_directory_is_readable_by_its_user_only(state):
    old = os.umask(0o022)
    try:
        with kept_ray._locked():
            pass
    finally:
        os.umask(old)
    assert os.stat(state).st_mode & 0o777 == 0o700


def test_ray_down_with_nothing_kept_says_so(state, capsys):
    from orchestrator import cli

    assert cli.main(["ray-down"]) == 0
    assert "no local Ray kept by train --keep-ray is running" in capsys.readouterr().out


def test_the_kept_head_gets_token_auth_and_loopback_unless_the_user_chose_an_address():
    env = kept_ray.head_env({"PATH": "/bin"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"
    assert kept_ray.head_env({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    argv = kept_ray.start_command(6390, 6391)
    assert argv[-6:] == ["--head", "--port=6390", "--ray-client-server-port=6391", "--include-dashboard=false",
                         "--disable-usage-stats", "--block"]


def test_keep_ray_with_an_address_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UsageError, match="--keep-ray starts or joins a local Ray of its own; drop it or --address"):
        prepare(TrainOptions(keep_ray=True, address="10.0.0.1:6379", output_dir=str(tmp_path)))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(UsageError, match="RAY_ADDRESS=10.0.0.1:6379"):
        prepare(TrainOptions(keep_ray=True, output_dir=str(tmp_path)))


def test_the_local_probe_runs_in_the_background_and_reports_a_hang_or_a_crash_as_the_nodes_issue(monkeypatch):
    from orchestrator.preflight import ProbeSettings, fanout

    release = threading.Event()
    monkeypatch.setattr(fanout.node_mod, "probe_or_reuse", lambda argv, settings, fresh, **kw: release.wait(30) and {"ok": 1})
    t0 = time.time()
    probe = fanout.LocalProbe(ProbeSettings(), fresh=False)
    assert time.time() - t0 < 1.0 and probe.ended is None  # made at once; the probe runs on
    raw, issue = probe.result(0.2)
    assert raw is None and issue.cause.code == "hang"
    release.set()
    assert probe.result(10) == ({"ok": 1}, None) and probe.started <= probe.ended

    def crash(argv, settings, fresh, **kw):
        raise OSError("no such interpreter")

    monkeypatch.setattr(fanout.node_mod, "probe_or_reuse", crash)
    raw, issue = fanout.LocalProbe(ProbeSettings(), fresh=True).result(10)
    assert raw is None and "no such interpreter" in issue.error and "OSError" in issue.cause.summary


# ---------------------------------------------------------------- through the CLI, with Ray


@pytest.mark.ray
def test_keep_ray_starts_a_head_the_next_run_joins_and_ray_down_stops(tmp_path, cli_env):
    cfg = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 2, "checkpoint_every": 2}})
    cli_env[kept_ray.STATE_DIR_ENV] = str(tmp_path / "state")
    # As a user's shell has it: unset (the tests' own Rays set it), so the loopback binding is the command's doing.
    cli_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    record_path = tmp_path / "state" / f"kept-ray-{os.uname().nodename}.json"
    cli_env[ray_token.TOKEN_PATH_ENV] = str(tmp_path / "ray" / "auth_token")  # none yet: the head makes it
    args = ["train", "--config-file", str(cfg), "--keep-ray", "--output-dir", str(tmp_path / "runs")]
    try:
        first = run_cli([*args, "--name", "first"], cli_env, ROOT)
        assert first.returncode == 0, first.stderr
        head = json.loads(record_path.read_text())
        for path, mode in ((tmp_path / "ray" / "auth_token", 0o600), (tmp_path / "ray", 0o700),
                           (tmp_path / "state", 0o700)):
            assert os.stat(path).st_mode & 0o777 == mode, path
        assert psutil.Process(head["pid"]).create_time() == pytest.approx(head["create_time"], abs=1.0)
        assert "stays up for the next train --keep-ray" in first.stdout
        s1 = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())["run"]
        # This machine's probe began before Ray was up, and ran while the head started.
        marks = s1["startup_marks"]
        assert marks["probe_start"] < marks["ray_up"] and s1["startup_s"]["probe_overlapped"] > 0
        assert s1["startup_s"]["ray_head_start"] <= s1["startup_s"]["ray_init"] <= s1["startup_s"]["ray_start"]
        assert s1["ray_address"].endswith(head["address"].rsplit(":", 1)[1])
        # workers_up splits where the worker's process started (startup_s' worker_process, worker_init).
        v1 = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())["variants"]
        timeline = next(iter(v1.values()))["timeline"]
        assert s1["startup_marks"]["fit_start"] <= timeline["worker_process"] <= timeline["worker_start"]
        assert s1["startup_s"]["worker_process"] + s1["startup_s"]["worker_init"] == pytest.approx(
            s1["startup_s"]["workers_up"], abs=0.01)

        # The driver that started the head is gone: the dead-session clean-up must leave the head alone.
        assert head["session_dir"] and Path(head["session_dir"]).is_dir()
        remove_dead_sessions()
        assert psutil.pid_exists(head["pid"]) and Path(head["session_dir"]).is_dir()

        second = run_cli([*args, "--name", "second"], cli_env, ROOT)
        assert second.returncode == 0, second.stderr
        assert f"reusing the kept local Ray (pid {head['pid']}" in second.stdout
        s2 = json.loads((tmp_path / "runs" / "second" / "summary.json").read_text())["run"]
        assert s2["ray_address"] == s1["ray_address"] and "ray_head_start" not in s2["startup_s"]

        down = run_cli(["ray-down"], cli_env, ROOT)
        assert down.returncode == 0
        assert f"stopped the local Ray kept by train --keep-ray (pid {head['pid']}" in down.stdout
        assert not kept_ray.KeptHead(**head).alive() and not record_path.exists()
        assert not Path(head["session_dir"]).exists()
    finally:
        if record_path.exists():
            run_cli(["ray-down"], cli_env, ROOT)


def test_the_driver_preloads_its_imports_only_when_this_command_starts_a_ray(state, monkeypatch):
    from orchestrator.run import starts_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert starts_ray(TrainOptions()) is True  # a Ray of its own
    assert starts_ray(TrainOptions(address="10.0.0.1:6379")) is False  # joins
    assert starts_ray(TrainOptions(keep_ray=True)) is True  # no kept head yet: starts it
    me = psutil.Process()
    _record(state, me.pid, me.create_time())
    assert starts_ray(TrainOptions(keep_ray=True)) is False  # joins the running head
    assert kept_ray.read_record() is not None  # asking changed nothing
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert starts_ray(TrainOptions()) is False


def test_a_joining_driver_preloads_once_joined_and_a_starting_one_before_ray_starts(tmp_path, monkeypatch):
    """The imports never share the interpreter with a join (they slowed a 0.4 s join to 2.2 s),
    and go on beside the probe's reuse and the plan once joined."""
    import contextlib

    from orchestrator import run, session

    class Stop(Exception):
        pass

    order = []

    @contextlib.contextmanager
    def fake_session(address, **kw):
        order.append("session")
        yield address or "127.0.0.1:1"

    monkeypatch.setattr(session, "ray_session", fake_session)
    monkeypatch.setattr(run, "_preload", lambda: order.append("preload"))
    monkeypatch.setattr(run, "_connect", lambda state, address: order.append("join"))
    monkeypatch.setattr(run, "_probe", lambda state, nodes: (_ for _ in ()).throw(Stop()))
    monkeypatch.setattr(run.preflight, "LocalProbe", lambda *a, **k: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for opts, want in ((TrainOptions(address="10.0.0.1:6379", output_dir=str(tmp_path)), ["session", "join", "preload"]),
                       (TrainOptions(output_dir=str(tmp_path)), ["preload", "session", "join"])):
        order.clear()
        with pytest.raises(Stop):
            run._train(opts, None, time.time())
        assert order == want


def test_ray_down_leaves_the_address_of_another_head(state, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "ray" / "session_x").mkdir(parents=True)
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379")  # a head started by hand since
    _record(state, gone.pid, time.time(), str(tmp_path / "ray" / "session_x"))
    assert kept_ray.down() is not None
    assert (tmp_path / "ray" / "ray_current_cluster").read_text() == "127.0.0.1:6379"


def test_a_kept_head_whose_ray_start_was_killed_leaves_nothing_behind_for_the_next_keep_ray(state, tmp_path, caplog):
    """`ray start` killed before any driver joined: its raylet (here a stand-in with the raylet's
    --session_dir argument) lives on in the group, and its session directory stays (issue 32)."""
    session = tmp_path / "ray" / "session_killed"
    session.mkdir(parents=True)
    (tmp_path / "ray" / "session_latest").symlink_to(session)
    agent = [sys.executable, "-c", "import time; time.sleep(600)", f"--session_dir={session}"]
    leader = subprocess.Popen([sys.executable, "-c", f"import subprocess, time; subprocess.Popen({agent!r}); "
                               "time.sleep(600)"], start_new_session=True)
    threading.Thread(target=leader.wait, daemon=True).start()
    try:
        deadline = time.time() + 30
        while not psutil.Process(leader.pid).children() and time.time() < deadline:
            time.sleep(0.05)
        raylet = psutil.Process(leader.pid).children()[0]
        path = _record(state, leader.pid, psutil.Process(leader.pid).create_time())  # no session_dir recorded yet
        leader.kill()  # the `ray start` dies; its raylet does not
        leader.wait(timeout=10)
        assert raylet.is_running()
        with caplog.at_level(logging.WARNING, logger="orchestrator.kept_ray"):
            assert kept_ray.find() is None  # what the next --keep-ray asks first
        assert "stopping what it left behind" in caplog.text
        psutil.wait_procs([raylet], timeout=10)
        assert not raylet.is_running() or raylet.status() == psutil.STATUS_ZOMBIE
        assert not session.exists() and not (tmp_path / "ray" / "session_latest").exists()
        assert not path.exists()
    finally:
        try:
            os.killpg(leader.pid, 9)
        except ProcessLookupError:
            pass


def test_a_gone_heads_pid_reused_by_another_process_is_not_signalled(state):
    """The record's pid now belongs to an unrelated process (here: this test's own): neither it nor
    its group is touched."""
    me = psutil.Process()
    _record(state, me.pid, me.create_time() - 3600)
    assert kept_ray.down() is not None  # the record goes; this process lives on
    assert me.is_running()
