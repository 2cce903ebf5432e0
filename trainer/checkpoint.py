"""Checkpoint files: what one rank writes, and how a directory is verified before it is used.

Rank 0 writes the model, optimizer and progress; every rank writes its own RNG state. Each
rank also writes a manifest of its files' SHA-256 and the world size, last, so a partial or
corrupt checkpoint (a rank that never finished, a truncated file) is detected on load and the
previous one is used instead. Nothing is trusted that does not verify.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STORAGE_NAME = "checkpoints"  # Ray Train's experiment name inside a variant's directory
from trainer.ray_internals import CHECKPOINT_SNAPSHOT_FILE as SNAPSHOT_FILE  # Ray's controller writes it on registration
# Where ranks write a checkpoint before Ray copies it into storage: inside the variant's
# directory rather than /tmp, so the driver can remove what a killed worker left half-written.
STAGING_DIR = ".staging"


def wait_until_registered(storage_dir: Path, checkpoint_dir_name: str, timeout_s: float = 60.0) -> bool:
    """Wait until Ray's controller has committed ``checkpoint_dir_name`` (it does so on its
    next poll after the report); used to make injected faults deterministic."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            snap = json.loads((storage_dir / SNAPSHOT_FILE).read_text())
            latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            if latest is not None and latest >= checkpoint_dir_name:
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


class CorruptCheckpoint(RuntimeError):
    pass


def checkpoint_dirs(storage_dir: Path) -> list[Path]:
    """``checkpoint_<step>`` directories, newest first (not Ray's checkpoint_manager_snapshot.json)."""
    if not storage_dir.is_dir():
        return []
    return sorted((p for p in storage_dir.glob("checkpoint_*") if p.name[11:].isdigit() and p.is_dir()), reverse=True)


def _manifest(directory: Path, rank: int) -> dict:
    path = directory / f"manifest_rank{rank}.json"
    if not path.is_file():
        raise CorruptCheckpoint(f"{directory}: no {path.name} (incomplete checkpoint)")
    try:
        m = json.loads(path.read_text())
        if not (isinstance(m, dict) and isinstance(m["files"], dict) and int(m["world_size"]) > 0):
            raise ValueError("not a manifest")
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"{path}: unreadable") from None
    return m


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(directory: Path, rank: int, state: dict | None, world_size: int = 1) -> None:
    """Write this rank's share: ``state`` (rank 0 only), its RNG, and its manifest last."""
    files = {}
    if state is not None:
        torch.save(state, directory / STATE_FILE)
        files[STATE_FILE] = _sha256(directory / STATE_FILE)
    rng_file = f"rng_rank{rank}.pt"
    torch.save(rng_state(), directory / rng_file)
    files[rng_file] = _sha256(directory / rng_file)
    manifest = {"rank": rank, "world_size": world_size, "files": files}
    (directory / f"manifest_rank{rank}.json").write_text(json.dumps(manifest, indent=1))


def verify(directory: Path) -> None:
    """Raise CorruptCheckpoint unless every rank's manifest is there and every file matches it."""
    world = int(_manifest(directory, 0)["world_size"])
    for rank in range(world):
        for name, digest in _manifest(directory, rank)["files"].items():
            path = directory / name
            if not path.is_file() or _sha256(path) != digest:
                raise CorruptCheckpoint(f"{path}: missing or does not match its checksum")
    if not (directory / STATE_FILE).is_file():
        raise CorruptCheckpoint(f"{directory}: no {STATE_FILE}")


def newest_usable(storage_dir: Path, committed: Path | None = None) -> Path | None:
    """The newest checkpoint in ``storage_dir`` that verifies, or None when there is none.

    ``committed`` is Ray's latest registered checkpoint. A newer directory can exist when a
    crash came after every rank had uploaded it but before Ray's controller registered it;
    complete and verified, it is as good as a committed one, and using it means a fault costs
    at most one checkpoint interval. Raises CorruptCheckpoint when ``committed`` is given and
    neither it nor anything else is usable (a fresh start would silently lose the run).
    """
    candidates = checkpoint_dirs(storage_dir)
    if committed is not None and committed not in candidates:
        candidates.append(committed)
        candidates.sort(key=lambda p: p.name, reverse=True)
    skipped = []
    for path in candidates:
        try:
            verify(path)
            if skipped:
                log.warning("using checkpoint %s; skipped unusable %s", path.name, "; ".join(skipped))
            return path
        except (CorruptCheckpoint, OSError) as e:
            skipped.append(f"{path.name} ({e})")
    if committed is not None:
        raise CorruptCheckpoint(f"no usable checkpoint in {storage_dir}: " + "; ".join(skipped))
    return None


def prune_unregistered(storage_dir: Path) -> None:
    """Remove checkpoint directories Ray never registered that are older than its latest one.

    They are uploads a crash cut off from Ray's bookkeeping (see ``newest_usable``); Ray's
    ``num_to_keep`` does not know them, so without this they would stay forever.
    """
    try:
        snap = json.loads((storage_dir / SNAPSHOT_FILE).read_text())
        known = {r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])}
        latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not latest:
        return
    for path in checkpoint_dirs(storage_dir):
        if path.name < latest and path.name not in known:
            shutil.rmtree(path, ignore_errors=True)


def read(directory: Path, rank: int, map_location="cpu") -> tuple[dict, dict | None]:
    """The shared state and this rank's RNG state (None when the rank did not exist then)."""
    verify(directory)
    state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=False)
    rng_file = directory / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return state, rng
