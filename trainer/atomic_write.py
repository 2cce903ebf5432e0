"""Write a file atomically: a reader, or a concurrent writer on the same node, sees the old file
or the new one, never half of one. The preflight and kernel caches, run files, the data's meta
file and the compile cache all go through here.

A uniquely named temporary file in the same directory (so the rename stays on one file system),
then ``os.replace``; a failed write removes its temporary file. The file gets the mode of a
plain ``open``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from trainer import strict_json


def _umask() -> int:
    """This process's umask, read without setting it (Linux 4.7+), else by the set-and-restore
    that would race with another thread creating a file."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp's 0600 would make these files private beside the run's others (metrics,
        # checkpoints): the mode a plain open gives, as for them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data: Any, *, indent: int | None = 2) -> None:
    write_text(path, strict_json.dumps(data, indent=indent, default=str) + "\n")
