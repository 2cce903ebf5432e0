"""Joining a Ray cluster, or starting a local one for the length of a command
(docs/faults-and-resume.md, "Nothing left behind" and "A driver killed with SIGKILL").

A local Ray listens on 127.0.0.1 only: it serves this one command on this one machine, and
otherwise its GCS, raylet, workers and agents (about 22 TCP ports) would be open on every
interface. Each local Ray of ours leaves a marker in its session directory naming its driver,
so the next command removes what a driver killed with SIGKILL left; the head ``train
--keep-ray`` keeps carries none: it is meant to outlive the driver that started it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import psutil

from orchestrator import interrupt, ray_token
from orchestrator.errors import UsageError
from orchestrator import ray_internals

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for 'auto' and other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or host.startswith("["):
        return None
    return host, int(port)


def check_reachable(address: str, flag: str = "--address") -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at ``address``."""
    hp = host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise UsageError(f"{flag} {address}: no Ray cluster answers at {hp[0]}:{hp[1]} ({why})") from None


def remove_session_dir(session_dir: Path) -> None:
    """Remove the temp files of a Ray this command started (logs, sockets, spilled objects).

    Only that session's directory, and ``session_latest`` if it still points at it; other
    sessions on the machine are left alone.
    """
    shutil.rmtree(session_dir, ignore_errors=True)
    latest = session_dir.parent / "session_latest"
    try:
        if latest.is_symlink() and Path(os.readlink(latest)).name == session_dir.name:
            latest.unlink()
    except OSError:
        pass


# Ray reads this when ray_constants is imported; "0" makes a node's address 127.0.0.1, and
# every process Ray starts gets the node's address on its command line.
CLUSTER_ENV = ray_internals.LOOPBACK_ENV
DRIVER_MARKER = "orchestrator_driver.json"
TERM_GRACE_S = 5.0


@contextmanager
def loopback_only() -> Iterator[bool]:
    """Within the block, a local Ray started binds to 127.0.0.1 (unless the user set CLUSTER_ENV)."""
    from ray._private import ray_constants

    if CLUSTER_ENV in os.environ:
        yield os.environ[CLUSTER_ENV] == "0"
        return
    before = getattr(ray_constants, ray_internals.LOOPBACK_CONSTANT)
    os.environ[CLUSTER_ENV] = "0"  # for the processes Ray starts
    setattr(ray_constants, ray_internals.LOOPBACK_CONSTANT, False)  # for this one, which imported Ray already
    try:
        yield True
    finally:
        os.environ.pop(CLUSTER_ENV, None)
        setattr(ray_constants, ray_internals.LOOPBACK_CONSTANT, before)


def _driver_id(p: psutil.Process) -> dict:
    return {"pid": p.pid, "host": platform.node(), "create_time": p.create_time()}


def mark_session(session_dir: Path) -> None:
    """Name this driver in its local Ray's session directory (see remove_dead_sessions)."""
    (session_dir / DRIVER_MARKER).write_text(json.dumps(_driver_id(psutil.Process())) + "\n")


def _driver_alive(marker: dict) -> bool:
    try:
        return abs(psutil.Process(int(marker["pid"])).create_time() - float(marker["create_time"])) < 1.0
    except psutil.NoSuchProcess:
        return False


def _names(arg: str, session_dir: Path) -> bool:
    """Whether a command-line argument names ``session_dir`` (not a longer name it prefixes)."""
    d = str(session_dir)
    i = arg.find(d)
    while i != -1:
        end = i + len(d)
        if end == len(arg) or arg[end] in "/ ,;'\"":
            return True
        i = arg.find(d, end)
    return False


def _session_processes(session_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names ``session_dir``, and Ray's agents, which retitle
    themselves (``ray::DashboardAgent``: no arguments left) but write their logs into it."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
            if any(_names(a, session_dir) for a in cmdline):
                out.append(p)
            elif cmdline and cmdline[0].startswith("ray::") and any(
                    _names(f.path, session_dir) for f in p.open_files()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def remove_dead_sessions(ray_tmp: Path | None = None) -> list[Path]:
    """Remove the session directories of our local Rays whose driver died (SIGKILL, OOM killer),
    after stopping the processes of that session still running; returns what was removed.

    Only directories holding our marker, written on this host by a driver that is gone; every
    other session on the machine (another program's Ray, a live run) is left alone.
    """
    ray_tmp = ray_tmp or Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    removed = []
    for marker_path in ray_tmp.glob(f"session_*/{DRIVER_MARKER}"):
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(marker, dict) or marker.get("host") != platform.node() or _driver_alive(marker):
            continue
        session_dir = marker_path.parent
        if session_dir.is_symlink():  # session_latest: its target is visited on its own
            continue
        procs = _session_processes(session_dir)
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=TERM_GRACE_S)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        log.info("removed %s, left by a driver (pid %s) that was killed", session_dir, marker.get("pid"))
        remove_session_dir(session_dir)
        removed.append(session_dir)
    return removed


@contextmanager
def _signals_stay_ours() -> Iterator[None]:
    """Keep ray.init from installing Ray's SIGTERM handlers: its Python one
    (orchestrator/ray_internals.SIGTERM_HOOK), and the C++ one its core worker installs in this
    process (Abseil's failure signal handler: it passes a SIGTERM on, but also sets a 3 s alarm
    that aborts the process, exit -6, when the driver's cleanup after the SIGTERM takes longer).
    Python's own handler is put back in front of it for every signal Python handles."""
    utils = importlib.import_module(ray_internals.RAY_UTILS_MODULE)
    original = getattr(utils, ray_internals.SIGTERM_HOOK)
    setattr(utils, ray_internals.SIGTERM_HOOK, lambda handler: None)
    try:
        yield
    finally:
        setattr(utils, ray_internals.SIGTERM_HOOK, original)
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                handler = signal.getsignal(s)
                if callable(handler):  # Python's C handler again, with the same Python function behind it
                    signal.signal(s, handler)


@contextmanager
def ray_session(address: str | None, *, log_to_driver: bool = False, num_cpus: int | None = None,
                keep_logs: bool = False, loopback: bool = False) -> Iterator[str]:
    """Yield the address of the Ray cluster in use.

    Reuses a Ray already initialised in this process (tests, notebooks); joins ``address``
    (or the cluster this driver runs in under ``ray job submit``, which sets RAY_ADDRESS);
    otherwise starts a new local Ray (``address="local"``: never some other cluster found on
    the machine) and on exit, success or not, stops it, waits for its processes and removes
    its session directory under /tmp/ray (kept with ``keep_logs``, for ``--debug``).

    ``loopback``: ``address`` is a head of ours bound to 127.0.0.1 (``train --keep-ray``), joined
    on loopback; otherwise Ray replaces 127.0.0.1 with the machine's address, where that head
    does not listen.
    """
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        check_reachable(address, flag)
    else:
        remove_dead_sessions()
    session_dir = None
    try:
        # An exception inside ray.init would leave half-started processes; Ray's SIGTERM handler
        # would exit with 15, or let a SIGINT that follows be reported instead.
        with interrupt.deferred(), _signals_stay_ours():
            try:
                if address:
                    log.info("joining Ray cluster at %s", address)
                    with loopback_only() if loopback else nullcontext():
                        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
                else:
                    log.info("starting a local Ray (no --address given)")
                    # "local": a new Ray of our own. A bare ray.init() would join whatever Ray another
                    # program on this machine started last (Ray records it in /tmp/ray).
                    # Ray's notice that its default (token auth on) is in force: not news to a
                    # user of a Ray that lives only as long as this command, and it would break
                    # the one-line-on-stderr promise.
                    logging.getLogger(ray_internals.AUTH_TOKEN_LOGGER).setLevel(logging.ERROR)
                    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token":  # Ray's default for a local Ray
                        ray_token.ensure_private()
                    with loopback_only():
                        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                                 log_to_driver=log_to_driver, logging_level=logging.WARNING)
                    session_dir = ray_internals.local_session_dir()
                    mark_session(session_dir)
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if address is None:
                    raise UsageError(f"cannot start a local Ray ({first})") from None
                raise UsageError(f"{flag} {address}: cannot connect to a Ray cluster ({first})") from None
        yield ray.get_runtime_context().gcs_address
    finally:
        with interrupt.deferred():
            ray.shutdown(wait_for_processes=True)
            if session_dir is not None:
                if keep_logs:
                    log.info("Ray logs kept in %s", session_dir)
                else:
                    remove_session_dir(session_dir)
