"""Joining a Ray cluster, or starting a local one for the length of a command."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from orchestrator import interrupt
from orchestrator.errors import UsageError
from trainer import ray_internals

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


@contextmanager
def ray_session(address: str | None, *, log_to_driver: bool = False, num_cpus: int | None = None,
                keep_logs: bool = False) -> Iterator[str]:
    """Yield the address of the Ray cluster in use.

    Reuses a Ray already initialised in this process (tests, notebooks); joins ``address``
    (or the cluster this driver runs in under ``ray job submit``, which sets RAY_ADDRESS);
    otherwise starts a new local Ray (``address="local"``: never some other cluster found on
    the machine) and on exit, success or not, stops it, waits for its processes and removes
    its session directory under /tmp/ray (kept with ``keep_logs``, for ``--debug``).
    """
    import ray

    if ray.is_initialized():
        yield ray.get_runtime_context().gcs_address
        return
    flag = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {"RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    if address:
        check_reachable(address, flag)
    session_dir = None
    try:
        with interrupt.deferred():  # an exception inside ray.init would leave half-started processes
            try:
                if address:
                    log.info("joining Ray cluster at %s", address)
                    ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
                else:
                    log.info("starting a local Ray (no --address given)")
                    # "local": a new Ray of our own. A bare ray.init() would join whatever Ray another
                    # program on this machine started last (Ray records it in /tmp/ray).
                    # Ray's notice that its default (token auth on) is in force: not news to a
                    # user of a Ray that lives only as long as this command, and it would break
                    # the one-line-on-stderr promise.
                    logging.getLogger(ray_internals.AUTH_TOKEN_LOGGER).setLevel(logging.ERROR)
                    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                             log_to_driver=log_to_driver, logging_level=logging.WARNING)
                    session_dir = ray_internals.local_session_dir()
            except (ConnectionError, RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if address is None:
                    raise UsageError(f"cannot start a local Ray ({first})") from None
                raise UsageError(f"{flag} {address}: cannot connect to a Ray cluster ({first})") from None
            finally:
                interrupt.install()  # ray.init replaced our SIGTERM handler with its own
        yield ray.get_runtime_context().gcs_address
    finally:
        with interrupt.deferred():
            ray.shutdown(wait_for_processes=True)
            if session_dir is not None:
                if keep_logs:
                    log.info("Ray logs kept in %s", session_dir)
                else:
                    remove_session_dir(session_dir)
