"""One driver per run directory: an exclusive ``flock`` on ``<run>/driver.lock``, held for as
long as the command runs.

Two drivers in one directory interleave their metrics and overwrite each other's summary, so
a second ``train --resume`` of a live run is refused at once, naming the live driver. The
kernel drops the lock when its holder exits however it exits (SIGKILL, a lost node's NFS
lease), so a killed driver leaves no stale lock behind: its file stays, unlocked, and only
its pid and host are kept for the message. The file is never deleted: a process that opened
it just before a delete would lock a file nobody else can see.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from orchestrator.errors import UsageError

log = logging.getLogger(__name__)

LOCK_FILE = "driver.lock"


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    since: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}"


class RunInUse(UsageError):
    """Another live driver holds the run directory."""


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


_held: list[int] = []  # descriptors of the locks this process holds, released by scope()


def acquire(run_dir: Path) -> None:
    """Lock ``run_dir`` for this driver until the enclosing ``scope()`` ends, or refuse (exit 2)."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Ray's processes (PEP 446)
    if not _try_lock(fd):
        live = _read_holder(fd)
        os.close(fd)
        raise RunInUse(f"{run_dir}: a live driver ({live.describe()}) is running this run; "
                       "let it end (or stop it) before resuming")
    me = {"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    _held.append(fd)
    log.debug("locked %s", path)


@contextmanager
def scope() -> Iterator[None]:
    """Locks acquired inside this block are released when it ends (at the latest, at exit)."""
    depth = len(_held)
    try:
        yield
    finally:
        while len(_held) > depth:
            fd = _held.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
