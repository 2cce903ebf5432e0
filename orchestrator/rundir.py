"""Run directories: ``<output-dir>/<run-name>/``, created atomically so names never collide."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from orchestrator.errors import UsageError


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"--name {name!r}: expected a plain directory name")


def check_new(output_dir: Path, name: str | None) -> None:
    """Refuse a given name that is taken, before anything starts (``create`` re-checks atomically)."""
    if name is not None:
        _check_name(name)
        if (output_dir / name).exists():
            path = output_dir / name
            raise UsageError(f"{path}: a run with this name exists; choose another --name or use --resume {path}")


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
            raise UsageError(f"{path}: a run with this name exists; choose another --name or use --resume {path}") from None
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
