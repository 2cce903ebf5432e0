"""The worker's side of checkpoints: restore the newest usable one, and save one and register it
with Ray Train. The on-disk format and its verification are ``trainer/checkpoint.py``.

Both are collective: every rank calls them at the same step, and every decision (which
checkpoint, whether to write, whether a write failed) is rank 0's or agreed by all, so a
failure on one rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint, driver_watch, failures, location, parallel
from trainer.config import FaultConfig

log = logging.getLogger(__name__)

FAULT_MARKER = ".fault-injected"


def store_of(spec, who: str) -> checkpoint.Store:
    """A variant's checkpoint storage: in its run directory, or in the bucket that directory is in,
    with node-local copies of its own for ``who`` ("rank<n>", "driver"), so two processes on one
    node never share a directory."""
    if spec.storage_uri is None:
        return checkpoint.Store(Path(spec.out_dir) / checkpoint.STORAGE_NAME)
    where = location.join(spec.storage_uri, checkpoint.STORAGE_NAME)
    return checkpoint.Store(where, cache=location.staging(where, location.COPIES) / who)


def upload_out_dir(spec) -> None:
    """Rank 0's metrics and TensorBoard events into the bucket (a node-local mirror otherwise
    only the driver's node would upload, and rank 0 may run on another). A failed upload is
    logged, not raised: it must not turn a trained variant into a failed one."""
    if spec.storage_uri is None:
        return
    try:
        location.upload(Path(spec.out_dir), spec.storage_uri)
    except OSError as e:
        log.warning("could not upload %s to %s: %s", spec.out_dir, spec.storage_uri, e)


@dataclass
class Restored:
    path: Path | str  # a URI where the checkpoint is in a bucket
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


def restore(store: checkpoint.Store | Path, committed: Path | None, *, rank: int, world: int, device: torch.device,
            model: torch.nn.Module, optimizer: torch.optim.Optimizer, strategy: str) -> Restored | None:
    """Load the newest usable checkpoint into the model and optimizer, and this rank's RNG.

    Rank 0 chooses (``checkpoint.newest_usable``: Ray's committed one or a newer complete
    upload, corrupt ones skipped) and tells the others, so every rank resumes from the same one
    (from a bucket, each rank reads its own local copy). Returns None to start fresh.
    """
    store = checkpoint.as_store(store)
    choice, found = (None, []), None
    if rank == 0:
        skipped: list[str] = []
        found = checkpoint.newest_usable(store, committed, skipped=skipped)
        choice = (found.name if found else None), skipped
    name, skipped = _broadcast(choice, world)
    if name is None:
        return None
    path = found or store.local(name)
    state, rng = checkpoint.read(path, rank, map_location=device)
    if not checkpoint.is_sharded(path) and parallel.get(strategy).shards:
        ddp = parallel.sharding(False)
        raise ValueError(f"checkpoint {path} is in the earlier layout of scaling.strategy {ddp} (state.pt), "
                         f"which this run's {strategy} does not load: resume it with {ddp}")
    try:
        checkpoint.load(path, model, optimizer, state)
    except RuntimeError as e:
        if not str(e).startswith(checkpoint.STATE_DICT_MISMATCH):
            raise
        # The config's model is not the checkpoint's (an edited config.yaml): every restart would say so.
        raise failures.DeterministicFailure("config", f"checkpoint {path} does not fit the model of this "
                                            f"config: {' '.join(str(e).split())[:400]}") from e
    if rng is not None:
        checkpoint.set_rng_state(rng)
    old_world = int(state.get("world_size", world))
    if store.remote:  # loaded: the local copy has served its purpose
        shutil.rmtree(path, ignore_errors=True)
        path = location.join(store.where, name)
    log.info("rank %d resumed from %s at step %d (written by %d worker(s))", rank, path, state["step"], old_world)
    return Restored(path=path, step=state["step"], first_loss=state.get("first_loss"), record=state.get("record") or {},
                    samples_consumed=int(state.get("samples_consumed", 0)), world_size=old_world, skipped=skipped)


class Saver:
    """Saves ``checkpoint_<step>`` and registers it with Ray Train.

    In a local storage directory the ranks write straight into it and report with
    ``NO_UPLOAD``: Ray leaves a checkpoint that is already inside its run directory in place
    (ray/train/v2 ``_internal/execution/context.py``), so each checkpoint is written once and
    needs its own size on disk, not twice. In a bucket each rank writes its share to a node-local
    directory and Ray uploads it.

    With ``asynchronous`` (``train.checkpoint_async``) training stands still only while the
    state is copied into CPU memory; a background thread writes the files from that copy and,
    once every rank's are down, reports the checkpoint to Ray (in a bucket with Ray's ASYNC
    upload, so the upload overlaps training too). At most one save is in flight: the next one,
    and the end of training, wait for it first, and raise its error, so a failed background
    write fails the run as a synchronous one does. The thread's collectives (DCP's and the
    agreement on errors) use a gloo group of their own, never the training's.

    ``block_s`` keeps, per checkpoint, the seconds training stood still for it: what an
    asynchronous save is measured by.
    """

    def __init__(self, store: checkpoint.Store, *, rank: int, world: int, strategy: str, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, fault: FaultConfig | None = None, marker_dir: Path | None = None,
                 asynchronous: bool = True):
        self.store, self.rank, self.world, self.strategy = store, rank, world, strategy
        self.model, self.optimizer = model, optimizer
        self.fault, self.marker_dir = fault, marker_dir
        self.asynchronous = asynchronous
        # Collective: every rank builds its Saver at the same point of the loop.
        self.group = dist.new_group(backend="gloo") if asynchronous and world > 1 else None
        self.block_s: list[dict] = []
        self._in_flight: threading.Thread | None = None
        self._error: BaseException | None = None

    def __call__(self, step: int, progress: dict, metrics: dict) -> str | None:
        """Save, register and return the checkpoint's name; None when this step's name is
        taken by a corrupt checkpoint Ray still lists (the next interval saves again)."""
        driver_watch.ensure_alive()  # a save begun after the driver died would belong to no run
        t0 = time.perf_counter()
        self.wait()
        name = checkpoint.checkpoint_name(step)
        skip = _broadcast(self._prepare(name) if self.rank == 0 else None, self.world)
        if skip:
            log.warning("not saving %s: %s", name, skip)
            self._report(metrics)
            return None
        directory = self._directory(name)
        sharded = checkpoint.sharded_state(self.model, self.optimizer)
        if not parallel.get(self.strategy).shards:  # every rank holds all of it: each saves its share
            sharded = checkpoint.replica_share(sharded, self.rank, self.world)
        state = progress if self.rank == 0 else None
        needed = checkpoint.tensor_bytes(sharded) + (1 << 20)
        self._agree(_attempt(checkpoint.check_free_space, directory, needed), directory, needed)
        rng = checkpoint.rng_state()  # now: training draws from the generators while the thread writes
        if self.asynchronous:  # training changes the tensors in place from the next step on
            args = (directory, name, step, _to_cpu(state), _to_cpu(sharded), rng, needed, metrics)
            self._in_flight = threading.Thread(target=self._write_in_background, args=args,
                                               name=f"save-{name}", daemon=True)
            self._in_flight.start()
        else:
            self._write_and_report(directory, name, step, state, sharded, rng, needed, metrics)
        self.block_s.append({"step": step, "block_s": round(time.perf_counter() - t0, 4)})
        return name

    def wait(self) -> None:
        """Until the save in flight (if any) is written and reported; raises what it raised."""
        if self._in_flight is not None:
            self._in_flight.join()
            self._in_flight = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """A failure path: let the save in flight end (complete, a resume may use it), and log its
        error rather than hide the failure being raised."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - the run is failing already, for another reason
            log.warning("the checkpoint being written when the run failed did not complete: %s", e)

    def _write_in_background(self, *args) -> None:
        try:
            self._write_and_report(*args)
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = e

    def _write_and_report(self, directory: Path, name: str, step: int, state: dict | None, sharded: dict | None,
                          rng: dict, needed: int, metrics: dict) -> None:
        self._agree(_attempt(self._write, directory, step, state, sharded, rng), directory, needed, self.group)
        self._report(metrics, directory, name)  # every rank's files are complete: Ray may register it

    def _report(self, metrics: dict, directory: Path | None = None, name: str | None = None) -> None:
        import ray.train  # [ray]

        if directory is None:
            ray.train.report(metrics)  # [ray]
            return
        mode = ray.train.CheckpointUploadMode  # [ray]
        ray.train.report(  # [ray] a barrier: Ray registers it once every rank has reported
            metrics, checkpoint=ray.train.Checkpoint(str(directory)), checkpoint_dir_name=name,
            checkpoint_upload_mode=(mode.NO_UPLOAD if not self.store.remote else
                                    mode.ASYNC if self.asynchronous else mode.SYNC),
            delete_local_checkpoint_after_upload=self.store.remote,
        )

    def _prepare(self, name: str) -> str | None:
        """Rank 0: make room for ``name``. A leftover Ray never registered (a write a crash cut
        off) is removed; one Ray did register is a corrupt one skipped on restore (else it would
        have been restored): Ray may delete it later, so it stays and this step is not saved."""
        if self.store.exists(name):
            if name in checkpoint.registered(self.store):
                return f"{self.store}/{name} is a corrupt checkpoint that Ray Train still lists"
            self.store.remove(name)
        if not self.store.remote:
            self.store.local(name).mkdir(parents=True)
        return None

    def _directory(self, name: str) -> Path:
        """Where this rank writes: into the storage directory itself, or (a bucket) an empty
        node-local directory of its own that Ray uploads from."""
        if not self.store.remote:
            return self.store.local(name)  # made by rank 0 in _prepare
        directory = self.store.cache / f"save-rank{self.rank}" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    def _write(self, directory: Path, step: int, state: dict | None, sharded: dict | None, rng: dict) -> None:
        checkpoint.write(directory, self.rank, state, self.world, sharded=sharded, rng=rng, group=self.group)
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

    def _agree(self, error: BaseException | None, directory: Path, needed: int, group=None) -> None:
        """Every rank learns whether any rank failed; then all raise the same error, and the
        partial directory is removed. A full disk raises DiskFull (not worth a retry)."""
        mine = None if error is None else (checkpoint.is_disk_full(error), f"{type(error).__name__}: {error}")
        if self.world > 1:
            everyone = [None] * self.world
            dist.all_gather_object(everyone, (mine, needed), group=group)
        else:
            everyone = [(mine, needed)]
        failures = [(r, m) for r, (m, _) in enumerate(everyone) if m is not None]
        if not failures:
            return
        if self.rank == 0 or self.store.remote:
            shutil.rmtree(directory, ignore_errors=True)
        if self.world > 1:
            dist.barrier(group=group)
        total = sum(n for _, n in everyone)
        if any(full for _, (full, _) in failures):
            raise checkpoint.DiskFull(directory, total, shutil.disk_usage(directory.parent).free) from error
        rank, (_, msg) = failures[0]
        raise RuntimeError(f"writing checkpoint {directory} failed on rank {rank}: {msg}") from error


def _to_cpu(obj):
    """A copy of a state dict's tensors in CPU memory (a DTensor stays one, over its own copy of
    the shard); what an asynchronous save writes from while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _attempt(fn, *args) -> BaseException | None:
    try:
        fn(*args)
        return None
    except Exception as e:  # reported to every rank by Saver._agree
        return e
