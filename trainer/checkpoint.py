"""Checkpoint files: what one rank writes, and how a directory is verified before it is used.

Rank 0 writes the model, optimizer and progress; every rank writes its own RNG state. Each
rank also writes a manifest of its files' SHA-256, last, so a partial or corrupt checkpoint
is detected on load (and the caller falls back to the previous one).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"
STORAGE_NAME = "checkpoints"  # Ray Train's experiment name inside a variant's directory
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray's controller on registration


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


def write(directory: Path, rank: int, state: dict | None) -> None:
    """Write this rank's share: ``state`` (rank 0 only), its RNG, and its manifest last."""
    files = {}
    if state is not None:
        torch.save(state, directory / STATE_FILE)
        files[STATE_FILE] = _sha256(directory / STATE_FILE)
    rng_file = f"rng_rank{rank}.pt"
    torch.save(rng_state(), directory / rng_file)
    files[rng_file] = _sha256(directory / rng_file)
    (directory / f"manifest_rank{rank}.json").write_text(json.dumps(files, indent=1))


def verify(directory: Path) -> None:
    """Raise CorruptCheckpoint unless rank 0's manifest is there and every listed file matches."""
    manifests = sorted(directory.glob("manifest_rank*.json"))
    if not (directory / "manifest_rank0.json").is_file():
        raise CorruptCheckpoint(f"{directory}: no manifest_rank0.json (incomplete checkpoint)")
    for manifest in manifests:
        try:
            files = json.loads(manifest.read_text())
        except ValueError:
            raise CorruptCheckpoint(f"{manifest}: unreadable") from None
        for name, digest in files.items():
            path = directory / name
            if not path.is_file() or _sha256(path) != digest:
                raise CorruptCheckpoint(f"{path}: missing or does not match its checksum")


def read(directory: Path, rank: int, map_location="cpu") -> tuple[dict, dict | None]:
    """The shared state and this rank's RNG state (None when the rank did not exist then)."""
    verify(directory)
    state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=False)
    rng_file = directory / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return state, rng
