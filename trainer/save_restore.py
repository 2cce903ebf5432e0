"""The worker's side of checkpoints: restore the newest usable one, and save one in place and
register it with Ray Train. The on-disk format and its verification are ``trainer/checkpoint.py``.

Both are collective: every rank calls them at the same step, and every decision (which
checkpoint, whether to write, whether a write failed) is rank 0's or agreed by all, so a
failure on one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import errno
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint, driver_watch, failures, parallel
from trainer.config import FaultConfig

log = logging.getLogger(__name__)

FAULT_MARKER = ".fault-injected"
# How torch's load_state_dict begins its error for missing, unexpected or differently shaped weights.
STATE_DICT_MISMATCH = "Error(s) in loading state_dict"


@dataclass
class Restored:
    path: Path
    step: int
    first_loss: float | None
    record: dict  # the last logged step's metrics: the result when the checkpoint is the last step
    samples_consumed: int  # the data position (windows consumed by all workers together)
    world_size: int  # of the run that wrote it
    skipped: list[str] = field(default_factory=list)


def _broadcast(value, world: int):
    box = [value]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def restore(storage_dir: Path, committed: Path | None, *, rank: int, world: int, device: torch.device,
            model: torch.nn.Module, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            strategy: str) -> Restored | None:
    """Load the newest usable checkpoint into the model and optimizer, and this rank's RNG.

    Rank 0 chooses (``checkpoint.newest_usable``: Ray's committed one or a newer complete
    upload, corrupt ones skipped) and tells the others, so every rank resumes from the same one.
    Returns None to start fresh.
    """
    choice = None, []
    if rank == 0:
        skipped: list[str] = []
        found = checkpoint.newest_usable(storage_dir, committed, skipped=skipped)
        choice = (str(found) if found else None), skipped
    path, skipped = _broadcast(choice, world)
    if path is None:
        return None
    path = Path(path)
    state, rng = checkpoint.read(path, rank, map_location=device)
    sharded = checkpoint.is_sharded(path)
    if sharded != parallel.get(strategy).shards:
        raise ValueError(f"checkpoint {path} was written with scaling.strategy {parallel.sharding(sharded)}; "
                         f"this run uses {strategy}: resume with the same strategy")
    try:
        parallel.get(strategy).load(path, state, model=model, raw_model=raw_model, optimizer=optimizer)
    except RuntimeError as e:
        if not str(e).startswith(STATE_DICT_MISMATCH):
            raise
        # The config's model is not the checkpoint's (an edited config.yaml): every restart would say so.
        raise failures.DeterministicFailure("config", f"checkpoint {path} does not fit the model of this "
                                            f"config: {' '.join(str(e).split())[:400]}") from e
    if rng is not None:
        checkpoint.set_rng_state(rng)
    old_world = int(state.get("world_size", world))
    log.info("rank %d resumed from %s at step %d (written by %d worker(s))", rank, path, state["step"], old_world)
    return Restored(path=path, step=state["step"], first_loss=state.get("first_loss"), record=state.get("record") or {},
                    samples_consumed=int(state.get("samples_consumed", 0)), world_size=old_world, skipped=skipped)


class Saver:
    """Writes ``checkpoint_<step>`` straight into Ray Train's storage directory and registers
    it with ``report(checkpoint_upload_mode=NO_UPLOAD)``: Ray leaves a checkpoint that is
    already inside its run directory in place (ray/train/v2 ``_internal/execution/context.py``),
    so each checkpoint is written once and needs its own size on disk, not twice."""

    def __init__(self, storage_dir: Path, *, rank: int, world: int, strategy: str, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, fault: FaultConfig | None = None, marker_dir: Path | None = None):
        self.storage_dir, self.rank, self.world, self.strategy = storage_dir, rank, world, strategy
        self.model, self.optimizer = model, optimizer
        self.fault, self.marker_dir = fault, marker_dir

    def __call__(self, step: int, progress: dict, metrics: dict) -> str | None:
        """Save, register and return the checkpoint's name; None when this step's name is
        taken by a corrupt checkpoint Ray still lists (the next interval saves again)."""
        import ray.train  # [ray]

        driver_watch.ensure_alive()  # a save begun after the driver died would belong to no run
        name = checkpoint.checkpoint_name(step)
        directory = self.storage_dir / name
        skip = _broadcast(self._prepare(directory) if self.rank == 0 else None, self.world)
        if skip:
            log.warning("not saving %s: %s", name, skip)
            ray.train.report(metrics)  # [ray]
            return None
        own, sharded = parallel.get(self.strategy).checkpoint_state(self.model, self.optimizer, self.rank)
        state = {**progress, **own} if self.rank == 0 else None
        needed = checkpoint.tensor_bytes(state) + checkpoint.tensor_bytes(sharded) + (1 << 20)
        self._agree(_attempt(checkpoint.check_free_space, self.storage_dir, needed), directory, needed)
        self._agree(_attempt(self._write, directory, step, state, sharded), directory, needed)
        ray.train.report(  # [ray] a barrier: Ray registers it once every rank has reported
            metrics, checkpoint=ray.train.Checkpoint(str(directory)), checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
        return name

    def _prepare(self, directory: Path) -> str | None:
        """Rank 0: make the directory empty. A leftover Ray never registered (a write a crash cut
        off) is removed; one Ray did register is a corrupt one skipped on restore (else it would
        have been restored): Ray may delete it later, so it stays and this step is not saved."""
        if directory.exists():
            if directory.name in checkpoint.registered(self.storage_dir):
                return f"{directory} is a corrupt checkpoint that Ray Train still lists"
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        return None

    def _write(self, directory: Path, step: int, state: dict | None, sharded: dict | None) -> None:
        checkpoint.write(directory, self.rank, state, self.world, sharded=sharded)
        self._maybe_inject_disk_full(step)

    def _maybe_inject_disk_full(self, step: int) -> None:
        """Test hook (train.fault with kind enospc): this rank's write fails once with ENOSPC,
        after its files are down, as a disk filling up during the write would."""
        f = self.fault
        if f is None or f.kind != "enospc" or f.rank != self.rank or f.step != step or self.marker_dir is None:
            return
        marker = self.marker_dir / FAULT_MARKER
        if marker.exists():
            return
        marker.write_text(f"rank {self.rank}: disk full at step {step}\n")
        raise OSError(errno.ENOSPC, "No space left on device (injected by train.fault)")

    def _agree(self, error: BaseException | None, directory: Path, needed: int) -> None:
        """Every rank learns whether any rank failed; then all raise the same error, and the
        partial directory is removed. A full disk raises DiskFull (not worth a retry)."""
        mine = None if error is None else (checkpoint.is_disk_full(error), f"{type(error).__name__}: {error}")
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, (mine, needed))
        else:
            everyone = [(mine, needed)]
        failures = [(r, m) for r, (m, _) in enumerate(everyone) if m is not None]
        if not failures:
            return
        if self.rank == 0:
            shutil.rmtree(directory, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        total = sum(n for _, n in everyone)
        if any(full for _, (full, _) in failures):
            raise checkpoint.DiskFull(directory, total, shutil.disk_usage(self.storage_dir).free) from error
        rank, (_, msg) = failures[0]
        raise RuntimeError(f"writing checkpoint {directory} failed on rank {rank}: {msg}") from error


def _attempt(fn, *args) -> BaseException | None:
    try:
        fn(*args)
        return None
    except Exception as e:  # reported to every rank by Saver._agree
        return e
