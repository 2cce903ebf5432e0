"""One driver per run directory: an exclusive ``flock`` on ``<run>/driver.lock``, held for as
long as the command runs; a run in a bucket also holds a lease there against drivers on other
machines (docs/faults-and-resume.md, "One driver per run directory"; docs/clusters.md, "Results
in a bucket").

Two drivers in one directory interleave their metrics and overwrite each other's summary. The
lock file is never deleted: a process that opened it just before a delete would lock a file
nobody else can see.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import psutil

from orchestrator.errors import UsageError
from trainer import location

log = logging.getLogger(__name__)

LOCK_FILE = "driver.lock"
LEASE_FILE = "driver.lease.json"  # in a bucket's run directory; never copied to or from a mirror
LEASE_TTL_S = 120.0
LEASE_RENEW_S = 30.0
LEASE_SETTLE_S = 1.0


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}"


class RunInUse(UsageError):
    """Another live driver holds the run directory."""


def in_use(run_dir: Path | str, who: str) -> RunInUse:
    """The refusal for ``run_dir``, held by the live driver described by ``who``."""
    return RunInUse(f"{run_dir}: a live driver ({who}) is running this run; let it end (or stop it) before resuming")


def _me() -> dict:
    """This driver, as a lock or a lease names it."""
    return {"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_holder(fd: int) -> Holder:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode())
        return Holder(int(data["pid"]), str(data["host"]), str(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):  # the holder has locked but not yet written
        return Holder(0, "unknown", "unknown")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def holder(run_dir: Path) -> Optional[Holder]:
    """The live driver using ``run_dir``, or None. Only looks: creates and changes nothing."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_holder(fd)
    finally:
        os.close(fd)


_held: list = []  # the locks this process holds (descriptors, leases), released by scope()


@dataclass
class _Lease:
    """This driver's lease on a bucket's run, renewed by a thread until released."""
    uri: str  # of the lease object
    me: dict
    stop: threading.Event = field(default_factory=threading.Event)
    renewer: Optional[threading.Thread] = None

    def renew(self) -> None:
        while not self.stop.wait(LEASE_RENEW_S):
            try:
                location.write_text(self.uri, json.dumps({**self.me, "renewed": time.time()}))
            except OSError as e:  # the next renewal may get through; a lapsed lease is said by the next driver
                log.warning("could not renew the run's lease %s: %s", self.uri, e)

    def release(self) -> None:
        self.stop.set()
        if self.renewer is not None:  # a renewal under way would put the lease back after its removal
            self.renewer.join(timeout=30)
        try:
            if (_read_lease(self.uri) or {}).get("token") == self.me["token"]:
                location.remove(self.uri)
        except OSError as e:
            log.warning("could not remove the run's lease %s: %s", self.uri, e)


def _read_lease(uri: str) -> Optional[dict]:
    try:
        lease = json.loads(location.read_text(uri))
        return lease if isinstance(lease, dict) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable lease %s (%s)", uri, e)
        return None


def _live_lease(lease: Optional[dict], taking: bool = False) -> Optional[str]:
    """Who holds ``lease`` and when it was renewed, if its driver may still run; None if not
    (``taking``: say so when a lapsed one is taken over)."""
    if not lease:
        return None
    try:
        pid, host, age = int(lease["pid"]), str(lease["host"]), time.time() - float(lease["renewed"])
    except (KeyError, TypeError, ValueError):
        return None
    if age > LEASE_TTL_S:
        if taking:
            log.warning("taking over the run from a driver (pid %s on host %s) whose lease lapsed %.0f s ago",
                        pid, host, age)
        return None
    if host == platform.node() and not psutil.pid_exists(pid):
        return None
    return f"pid {pid} on host {host}, its lease renewed {max(age, 0):.0f} s ago"


def _settle() -> None:
    """Time for a driver that read no lease just before this one wrote to write its own."""
    time.sleep(LEASE_SETTLE_S)


def bucket_holder(run_uri: str) -> Optional[str]:
    """The live driver of the bucket's run ``run_uri`` on any machine, described; None if none."""
    return _live_lease(_read_lease(location.join(run_uri, LEASE_FILE)))


def _take_lease(run_uri: str) -> _Lease:
    uri = location.join(run_uri, LEASE_FILE)
    live = _live_lease(_read_lease(uri), taking=True)
    if live is not None:
        raise in_use(run_uri, live)
    me = {**_me(), "token": secrets.token_hex(8)}
    location.write_text(uri, json.dumps({**me, "renewed": time.time()}))
    _settle()
    kept = _read_lease(uri) or {}
    if kept.get("token") != me["token"]:
        raise RunInUse(f"{run_uri}: another driver (pid {kept.get('pid')} on host {kept.get('host')}) took "
                       "this run at the same moment; let it end (or stop it) before resuming")
    lease = _Lease(uri, me)
    lease.renewer = threading.Thread(target=lease.renew, name="run-lease", daemon=True)
    lease.renewer.start()
    return lease


def acquire(run_dir: Path) -> None:
    """Lock ``run_dir`` for this driver until the enclosing ``scope()`` ends, or refuse (exit 2)."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Ray's processes (PEP 446)
    if not _try_lock(fd):
        live = _read_holder(fd)
        os.close(fd)
        raise in_use(run_dir, live.describe())
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
    _held.append(fd)
    log.debug("locked %s", path)
    uri = location.uri_of(run_dir)
    if uri is not None:  # and against drivers on other machines
        try:
            _held.append(_take_lease(uri))
        except OSError as e:
            raise UsageError(f"{uri}: cannot write the run's lease ({str(e).splitlines()[0]})") from None


@contextmanager
def scope() -> Iterator[None]:
    """Locks acquired inside this block are released when it ends (at the latest, at exit)."""
    depth = len(_held)
    try:
        yield
    finally:
        while len(_held) > depth:
            held = _held.pop()
            if isinstance(held, _Lease):
                held.release()
            else:
                fcntl.flock(held, fcntl.LOCK_UN)
                os.close(held)
