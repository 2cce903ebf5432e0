"""Write a file atomically: a reader, or a concurrent writer on the same node, sees the old file
or the new one, never half of one. The preflight and kernel caches, run files, the data's meta
file and the compile cache all go through here.

A uniquely named temporary file in the same directory (so the rename stays on one file system),
then ``os.replace``; a failed write removes its temporary file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from trainer import strict_json


def write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
