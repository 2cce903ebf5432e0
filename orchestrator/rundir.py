"""Run directories: ``<output-dir>/<run-name>/``, created atomically so names never collide."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator import runlock
from orchestrator.errors import UsageError
from trainer import atomic_write, location

# Longest file name most filesystems take (ext4, xfs, NFS: 255 bytes); a longer --name would
# fail only once Ray is up, as a raw OSError.
NAME_MAX = 255


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"--name {name!r}: expected a plain directory name")
    if len(os.fsencode(name)) > NAME_MAX:
        raise UsageError(f"--name: {len(os.fsencode(name))} bytes long; a directory name may have at most {NAME_MAX}")


def _taken(path: Path) -> UsageError:
    live = runlock.holder(path)
    if live is not None:  # --resume would be refused too: say so rather than recommend it
        return UsageError(f"{path}: a live run ({live.describe()}) uses this name; choose another --name")
    return UsageError(f"{path}: a run with this name exists; choose another --name or use --resume {path}")


def check_directory(label: str, path: Path) -> Path | None:
    """Refuse a ``path`` that can never be a directory (a file, or under one); returns the nearest
    of it and its parents that exists."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"is under {p}, which is a file"
                raise UsageError(f"{label} {path}: {where}; expected a directory")
            return p
    return None


def check_output_dir(output_dir: Path) -> None:
    """Refuse an --output-dir that can never hold a run directory (a file, under one, or read-only)."""
    p = check_directory("--output-dir", output_dir)
    if p is not None and not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {output_dir}: {p} is not writable")


def local_output_dir(output_dir: str) -> Path:
    """Where this machine makes run directories for ``--output-dir``: itself, or a bucket's mirror."""
    return location.staging(output_dir) if location.is_uri(output_dir) else Path(output_dir)


def check_new(output_dir: str, name: str | None) -> None:
    """Refuse what ``create`` would refuse, before anything starts (``create`` re-checks atomically;
    in a bucket, a name taken between the check and the first upload is not noticed)."""
    if location.is_uri(output_dir):
        if name is not None:
            _check_name(name)
            uri = location.join(output_dir, name)
            if location.exists(uri):
                raise UsageError(f"{uri}: a run with this name exists; choose another --name or use --resume {uri}")
        return
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    if name is not None:
        _check_name(name)
        if (output_dir / name).exists():
            raise _taken(output_dir / name)


def create(output_dir: Path, name: str | None, prefix: str = "run") -> Path:
    """A new, empty run directory. A given name must be new; a default name gets a suffix."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{output_dir}: cannot create output directory ({e.strerror})") from None
    if name is not None:
        _check_name(name)
        path = output_dir / name
        try:
            path.mkdir()
        except FileExistsError:
            raise _taken(path) from None
        return path
    base = time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    for i in range(1, 10_000):
        path = output_dir / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()  # atomic: exactly one of two racing runs gets each name
            return path
        except FileExistsError:
            continue
    raise UsageError(f"{output_dir}: could not find a free run name")


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: readers see the old file or the new one, never half of one."""
    atomic_write.write_text(path, text)


def write_json(path: Path, data) -> None:
    atomic_write.write_json(path, data)
