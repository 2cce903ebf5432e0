"""A local Ray kept running between commands: ``train --keep-ray`` and ``ray-down``
(docs/startup.md, "Warm mode: `--keep-ray`").

The record, per user and host in a directory only its user can read, holds the pid and the
start time of the ``ray start`` process, so a reused pid is not mistaken for it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional

import psutil

from orchestrator import ray_token, rundir
from orchestrator.errors import UsageError
from orchestrator import ray_internals

log = logging.getLogger(__name__)

STATE_DIR_ENV = "FLASH_ORCHESTRATOR_STATE_DIR"  # overrides the location (tests, the startup bench)
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
STARTED_LINE = "Ray runtime started"  # what `ray start` prints once the head is up
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter
DOWN_COMMAND = "python -m orchestrator ray-down"


def state_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV])
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "flash-orchestrator"


def _path(suffix: str) -> Path:
    return state_dir() / f"kept-ray-{platform.node()}.{suffix}"


@dataclass
class KeptHead:
    pid: int  # the `ray start --block` process; its process group holds every process of the node
    create_time: float
    address: str  # host:port of the GCS
    started: str  # local time, ISO 8601
    session_dir: Optional[str] = None  # filled in by the first driver that joins

    def alive(self) -> bool:
        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.create_time) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def describe(self) -> str:
        return f"pid {self.pid}, address {self.address}, since {self.started}"


def read_record() -> Optional[KeptHead]:
    """The recorded head, alive or not; None when there is no readable record."""
    path = _path("json")
    try:
        return KeptHead(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("ignoring the unreadable kept-Ray record %s (%s)", path, e)
        return None


def _write_record(head: KeptHead) -> None:
    rundir.write_json(_path("json"), asdict(head))


def find() -> Optional[KeptHead]:
    """The kept head of this user on this host, if it still runs. A record of one that is gone (a
    reboot, a killed ``ray start``) is removed with a warning, and what that head left behind goes
    too: the processes of its group (a GCS, a raylet, agents) and its session directory."""
    head = read_record()
    if head is None:
        return None
    if not head.alive():
        log.warning("the kept local Ray recorded in %s is gone (%s); stopping what it left behind and "
                    "ignoring its record", _path("json"), head.describe())
        _dispose(head)
        return None
    return head


@contextmanager
def _locked() -> Iterator[None]:
    path = _path("lock")
    # The record and the head's log are this user's business alone.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def head_env(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The head's environment: the command's, with token auth on, loopback only (unless the user
    chose otherwise, as for a plain local Ray) and nothing to drain on stop."""
    env = dict(os.environ if environ is None else environ)
    env["RAY_AUTH_MODE"] = "token"
    env.setdefault(ray_internals.LOOPBACK_ENV, "0")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # On SIGTERM Ray drains the node first (30 s by default) for Ray Serve; nothing to drain here.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    return env


def start_command(port: int, client_port: int) -> list[str]:
    # The Ray Client server's port too: its default (10001) is taken by the first head of the machine.
    return [*RAY_CLI, "start", "--head", f"--port={port}", f"--ray-client-server-port={client_port}",
            "--include-dashboard=false", "--disable-usage-stats", "--block"]


def _start() -> KeptHead:
    env = head_env()
    ray_token.ensure_private(env)  # `ray start` does not make one; a local ray.init() would have
    port, client_port = _free_ports(2)
    log_path = _path("log")
    log.info("starting a local Ray to keep (--keep-ray): 127.0.0.1:%d", port)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(start_command(port, client_port), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    head = KeptHead(pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), address=f"127.0.0.1:{port}",
                    started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_record(head)  # before it is up: a ray-down meanwhile finds it
    deadline = time.monotonic() + START_TIMEOUT_S
    while STARTED_LINE not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = " ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
            _dispose(head)
            raise UsageError(f"cannot start a local Ray to keep ({tail or 'no output'}); full log: {log_path}")
        time.sleep(0.2)
    return head


def ensure() -> tuple[KeptHead, bool]:
    """The kept head, started if none runs; (head, whether this call started it). Afterwards this
    process has token auth on, so its ray.init can join the head."""
    with _locked():
        head = find()
        started = head is None
        if started:
            head = _start()
        else:
            log.info("reusing the kept local Ray (%s)", head.describe())
    ray_internals.enable_token_auth()
    return head, started


def note_session(head: KeptHead, session_dir: Path) -> None:
    """Record the head's session directory (what ``ray-down`` removes once the head is stopped)."""
    with _locked():
        current = read_record()
        if current is not None and current.pid == head.pid and current.session_dir != str(session_dir):
            current.session_dir = str(session_dir)
            _write_record(current)


def _group(head: KeptHead) -> list[psutil.Process]:
    """The processes of the head's group started since the head: its GCS, raylet and agents, also
    after the ``ray start`` that leads the group has died. An unrelated process that got the pid
    later is neither in the group nor that old."""
    members = []
    for p in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(p.pid) == head.pid and p.info["create_time"] >= head.create_time - 1.0:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def _session_dir(head: KeptHead, members: list[psutil.Process]) -> Optional[str]:
    """The head's session directory: recorded by the first driver that joined, else read from
    its raylet's command line (a head killed before any driver joined)."""
    if head.session_dir:
        return head.session_dir
    for p in members:
        try:
            for arg in p.cmdline():
                if arg.startswith(("--session_dir=", "--session-dir=")):
                    return arg.split("=", 1)[1]
        except psutil.Error:
            pass
    return None


def _stop(head: KeptHead) -> None:
    """The `ray start --block` process first (it stops the node's processes in order), then
    whatever of its process group outlived it."""
    if head.alive():
        os.kill(head.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while head.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = _group(head)
        for p in members:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(members, timeout=5.0)
        if not alive:
            return


def _dispose(head: KeptHead) -> None:
    """Stop the head and whatever its group left, remove its session directory, the address it
    left for ``ray.init()`` and its record. Under the lock."""
    session_dir = _session_dir(head, _group(head))
    _stop(head)
    if session_dir:
        from orchestrator.session import remove_session_dir

        remove_session_dir(Path(session_dir))
    _forget_address(head, session_dir)
    _path("json").unlink(missing_ok=True)  # the record


def down() -> Optional[KeptHead]:
    """Stop the kept head of this user on this host and remove its session directory; returns
    what was stopped (None: none was running)."""
    with _locked():
        head = read_record()
        if head is None:
            return None
        if not head.alive():
            log.warning("the kept local Ray recorded in %s was gone already (%s)", _path("json"), head.describe())
        _dispose(head)  # a gone head's group may still hold processes: they go too
    return head


def _forget_address(head: KeptHead, session_dir: Optional[str]) -> None:
    """Remove the address the head left for ``ray.init()``, which would otherwise try the stopped one."""
    path = ray_internals.address_file(Path(session_dir).parent if session_dir else None)
    try:
        if path.read_text().strip().rsplit(":", 1)[-1] == head.address.rsplit(":", 1)[-1]:  # same port: this head's
            path.unlink()
    except OSError:  # none left, or another's
        pass
