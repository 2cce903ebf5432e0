"""Checkpoint files: what one rank writes, and how a directory is verified before it is used.

A checkpoint is ``<variant>/checkpoints/checkpoint_<step:08d>/``, written in place by the ranks
(no staging copy) and then registered with Ray Train. One layout for every strategy, as
torchtitan's: the ranks write ``{"model": ..., "optimizer": ...}`` into ``dcp/`` with
``torch.distributed.checkpoint`` (files ``__<rank>_<n>.distcp``; rank 0 also ``.metadata``),
keyed by parameter name as ``get_state_dict`` keys them (model tensors under ``model.<name>``,
the fp32 masters where the weights are bf16), nothing gathered onto one rank: under fsdp each
writes its shards, under ddp its ``replica_share``. DCP reshards on load: a checkpoint of N
workers of either strategy loads into a run of M workers of either. Rank 0 writes the progress
("step", "first_loss", "samples_consumed", "world_size", ...) into ``state.pt``, where ddp's
earlier layout also kept "model" and "optimizer" (no ``dcp/``): those still resume and export.

Every rank writes its RNG state and, last, a manifest of its files' SHA-256 and the world size,
so a partial or corrupt checkpoint (a rank that never finished, a truncated or altered file)
is detected on load and the previous one is used instead. Nothing is trusted that does not verify.
Every file is read as data only (``trainer/safe_load.py``), and verification refuses one that
holds anything else, so a planted pickle is skipped like a corrupt file and never runs.

The storage directory may be in a bucket (``Store``): there a checkpoint is verified and read
from a local copy, and Ray Train uploads each rank's files. Verification does not care in which
order the files arrive: a checkpoint counts only once every rank's manifest and every file it
names are there and match, so an upload cut short is skipped like a partial write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from trainer import location, master_weights, safe_load

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DCP_DIR = "dcp"
DCP_METADATA = ".metadata"  # DCP's index, written by rank 0 once every rank's shards are down
STORAGE_NAME = "checkpoints"  # Ray Train's experiment name inside a variant's directory
REJECTED_NAME = "rejected_checkpoints"  # beside STORAGE_NAME: what a resume found unusable, kept for a look
# Ray Train V2's controller writes its list of registered checkpoints here, in the run's storage
# directory; --resume and the worker's checkpoint choice read it. A private name of Ray's
# (CHECKPOINT_MANAGER_SNAPSHOT_FILENAME), checked by tests/test_ray_internals.py.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# How load_state_dict begins its error for missing, unexpected or differently shaped weights (``load``'s too).
STATE_DICT_MISMATCH = "Error(s) in loading state_dict"
# A checkpoint needs about its tensors' bytes; the margin covers pickling and the filesystem.
SPACE_MARGIN = 1.1


class Store:
    """Ray Train's storage directory of one variant (``<variant>/checkpoints``): its checkpoint
    directories and Ray's snapshot, in a local directory or under a URI. A remote checkpoint
    is copied into ``cache`` (node-local) before it is verified or read."""

    def __init__(self, where: str | Path, cache: Path | None = None):
        self.where = str(where)
        self.remote = location.is_uri(self.where)
        self.cache = cache or (location.staging(self.where, location.COPIES) if self.remote else None)

    def __str__(self) -> str:
        return self.where

    def names(self) -> list[str]:
        """``checkpoint_<step>`` names, newest first."""
        found = location.subdirs(self.where) if self.remote else [p.name for p in checkpoint_dirs(Path(self.where))]
        return sorted((n for n in found if n.startswith("checkpoint_") and n[11:].isdigit()), reverse=True)

    def local(self, name: str) -> Path:
        """A local directory holding checkpoint ``name``: itself, or a fresh copy of the remote one."""
        if not self.remote:
            return Path(self.where) / name
        return location.download(location.join(self.where, name), self.cache / name)

    def exists(self, name: str) -> bool:
        if self.remote:
            return location.exists(location.join(self.where, name))
        return (Path(self.where) / name).exists()

    def remove(self, name: str) -> None:
        if self.remote:
            location.remove(location.join(self.where, name))
            shutil.rmtree(self.cache / name, ignore_errors=True)
        else:
            shutil.rmtree(Path(self.where) / name, ignore_errors=True)

    def snapshot(self) -> dict | None:
        try:
            text = (location.read_text(location.join(self.where, SNAPSHOT_FILE)) if self.remote
                    else (Path(self.where) / SNAPSHOT_FILE).read_text())
            snap = json.loads(text)
            return snap if isinstance(snap, dict) else None
        except (OSError, ValueError):  # FileNotFoundError is an OSError on both sides
            return None

    def write_snapshot(self, snap: dict) -> None:
        if self.remote:
            location.write_text(location.join(self.where, SNAPSHOT_FILE), json.dumps(snap))
            return
        tmp = Path(self.where) / (SNAPSHOT_FILE + ".tmp")
        tmp.write_text(json.dumps(snap))
        tmp.replace(Path(self.where) / SNAPSHOT_FILE)


def as_store(storage: "Store | str | Path") -> Store:
    return storage if isinstance(storage, Store) else Store(storage)


def wait_until_registered(storage: Store | str | Path, checkpoint_dir_name: str, timeout_s: float = 60.0) -> bool:
    """Wait until Ray's controller has committed ``checkpoint_dir_name`` (it does so on its
    next poll after the report); used to make injected faults deterministic."""
    store = as_store(storage)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = ((store.snapshot() or {}).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if latest is not None and latest >= checkpoint_dir_name:
            return True
        time.sleep(0.1)
    return False


class CorruptCheckpoint(RuntimeError):
    pass


class DiskFull(OSError):
    """No space left for a checkpoint: deterministic, so the run stops instead of retrying."""

    def __init__(self, path: Path, needed: int, free: int):
        super().__init__(errno.ENOSPC, f"no space left on device: checkpoint {path} needs about "
                                       f"{_mb(needed)}, {_mb(free)} free; free space there, or lower "
                                       f"scaling.keep_checkpoints / raise train.checkpoint_every")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state dict (a DTensor counts its local shard)."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_free_space(directory: Path, needed: int) -> None:
    """Raise DiskFull unless the filesystem of ``directory`` has room for ``needed`` bytes."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * SPACE_MARGIN:
        raise DiskFull(directory, int(needed * SPACE_MARGIN), free)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC however it surfaces: an OSError, or torch.save's RuntimeError from its zip
    writer ("unexpected pos ..."), anywhere in the exception's chain."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


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
    """Every generator's state as plain data (lists, ints, tensors), which a data-only load reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]  # keys: a list, or an ndarray in older checkpoints
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(directory: Path, rank: int, state: dict | None, world_size: int = 1, sharded: dict | None = None,
          rng: dict | None = None, group=None) -> None:
    """Write this rank's share: ``state`` (rank 0 only: state.pt), its share of ``sharded``
    (every rank, collective over ``group``: DCP), its RNG (``rng``, taken at the step
    saved; by default now), and its manifest last."""
    files = {}
    if sharded is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(sharded, checkpoint_id=directory / DCP_DIR, process_group=group)
        files.update({f"{DCP_DIR}/{p.name}": _sha256(p) for p in sorted((directory / DCP_DIR).glob(f"__{rank}_*"))})
        if rank == 0:
            files[f"{DCP_DIR}/{DCP_METADATA}"] = _sha256(directory / DCP_DIR / DCP_METADATA)
    if state is not None:
        torch.save(state, directory / STATE_FILE)
        files[STATE_FILE] = _sha256(directory / STATE_FILE)
    rng_file = f"rng_rank{rank}.pt"
    torch.save(rng if rng is not None else rng_state(), directory / rng_file)
    files[rng_file] = _sha256(directory / rng_file)
    manifest = {"rank": rank, "world_size": world_size, "files": files}
    (directory / f"manifest_rank{rank}.json").write_text(json.dumps(manifest, indent=1))


def is_sharded(directory: Path) -> bool:
    return (directory / DCP_DIR).is_dir()


def verify(directory: Path) -> None:
    """Raise CorruptCheckpoint unless every rank's manifest is there, every file matches it and
    every pickled file is plain data (the manifests can be rewritten, so they do not vouch for that)."""
    world = int(_manifest(directory, 0)["world_size"])
    for rank in range(world):
        for name, digest in _manifest(directory, rank)["files"].items():
            path = directory / name
            if not path.is_file() or _sha256(path) != digest:
                raise CorruptCheckpoint(f"{path}: missing or does not match its checksum")
    if not (directory / STATE_FILE).is_file():
        raise CorruptCheckpoint(f"{directory}: no {STATE_FILE}")
    if is_sharded(directory) and not (directory / DCP_DIR / DCP_METADATA).is_file():
        raise CorruptCheckpoint(f"{directory}: no {DCP_DIR}/{DCP_METADATA} (incomplete sharded checkpoint)")
    try:
        for path in sorted(directory.glob("*.pt")):  # what a load would open, listed in a manifest or not
            safe_load.load(path, mmap=True)  # mapped, not read: the check costs the pickle, not the tensors
        if is_sharded(directory):
            safe_load.check_dcp(directory / DCP_DIR)
    except (safe_load.UnsafeFile, RuntimeError) as e:  # RuntimeError: not torch.save's zip format
        raise CorruptCheckpoint(str(e).splitlines()[0]) from None


def newest_usable(storage: Store | str | Path, committed: Path | None = None,
                  skipped: list[str] | None = None) -> Path | None:
    """The newest checkpoint in ``storage`` that verifies (a local directory: a remote one's
    copy), or None when there is none.

    ``committed`` is Ray's latest registered checkpoint. A newer directory can exist when a
    crash came after every rank had uploaded it but before Ray's controller registered it;
    complete and verified, it is as good as a committed one, and using it means a fault costs
    at most one checkpoint interval. Raises CorruptCheckpoint when ``committed`` is given and
    neither it nor anything else is usable (a fresh start would silently lose the run).
    ``skipped`` (when given) receives one line per checkpoint skipped, with the reason.
    """
    store = as_store(storage)
    candidates = store.names()
    if committed is not None and committed.name not in candidates:
        candidates = sorted([*candidates, committed.name], reverse=True)
    skipped = [] if skipped is None else skipped
    for name in candidates:
        try:
            path = store.local(name)
            verify(path)
            if skipped:
                log.warning("using checkpoint %s; skipped unusable %s", name, "; ".join(skipped))
            return path
        except (CorruptCheckpoint, OSError) as e:
            skipped.append(f"{name} ({e})")
    if committed is not None:
        raise CorruptCheckpoint(f"no usable checkpoint in {store}: " + "; ".join(skipped))
    return None


def registered(storage: Store | str | Path) -> set[str]:
    """Names of the checkpoints Ray Train has registered (and may hand to a worker or delete)."""
    snap = as_store(storage).snapshot() or {}
    try:
        return {r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])}
    except (KeyError, TypeError):
        return set()


def prune_unregistered(storage: Store | str | Path) -> None:
    """Remove checkpoint directories Ray never registered that are older than its latest one,
    or that do not verify (what a killed or failed write left).

    Complete older ones are uploads a crash cut off from Ray's bookkeeping (see
    ``newest_usable``); Ray's ``num_to_keep`` does not know them, so without this they would
    stay forever. A complete one newer than Ray's latest is kept: a resume uses it.
    """
    store = as_store(storage)
    snap = store.snapshot()
    if snap is None:
        return
    known = registered(store)
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
    for name in store.names():
        if name in known:
            continue
        try:
            keep = name >= latest and verifies(store.local(name))
        except OSError:  # the copy out of a bucket failed
            keep = False
        if not keep:
            store.remove(name)


def verifies(path: Path) -> bool:
    try:
        verify(path)
        return True
    except (CorruptCheckpoint, OSError):
        return False


def _free_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``...: a later resume may reject a checkpoint of the same name."""
    n = 0
    while (candidate := path.with_name(f"{path.name}.{n}" if n else path.name)).exists():
        n += 1
    return candidate


def drop_unusable(storage: Store | str | Path) -> list[str]:
    """Before Ray Train starts on ``storage`` (a resume): unregister every registered checkpoint
    that does not verify and move it into ``REJECTED_NAME`` beside (in a bucket: remove it), so
    Ray never hands it to a worker nor counts it again, and no one loses local files. Returns one
    line per checkpoint dropped, and one more when nothing usable is left (the variant starts
    over), and logs them.

    Ray reads its snapshot only when its controller starts, so this edits the file (its format
    is Ray's: ``orchestrator``'s Ray-internals list names it) and then removes the directory.
    """
    store = as_store(storage)
    snap = store.snapshot()
    if not snap or not snap.get("checkpoint_results"):
        return []
    results, indices = snap["checkpoint_results"], snap.get("checkpoint_report_indices", [])
    bad = []
    for r in results:
        name = r.get("checkpoint_dir_name", "")
        try:
            verify(store.local(name))
        except (CorruptCheckpoint, OSError) as e:
            bad.append((name, str(e)))
    if not bad:
        return []
    names = {name for name, _ in bad}
    keep = [i for i, r in enumerate(results) if r["checkpoint_dir_name"] not in names]
    snap["checkpoint_results"] = [results[i] for i in keep]
    if len(indices) == len(results):
        snap["checkpoint_report_indices"] = [indices[i] for i in keep]
    latest = snap.get("latest_checkpoint_result") or {}
    if latest.get("checkpoint_dir_name") in names:
        snap["latest_checkpoint_result"] = snap["checkpoint_results"][-1] if snap["checkpoint_results"] else None
    snap["pending_training_results"] = [r for r in snap.get("pending_training_results", [])
                                        if r.get("checkpoint_dir_name") not in names]
    store.write_snapshot(snap)
    lines = []
    for name, why in bad:
        if store.remote:
            store.remove(name)
            lines.append(f"skipped and removed checkpoint {name}: {why}")
            continue
        rejected = Path(store.where).parent / REJECTED_NAME
        rejected.mkdir(exist_ok=True)
        if store.exists(name):
            (Path(store.where) / name).replace(_free_name(rejected / name))
        lines.append(f"skipped checkpoint {name}, moved into {rejected}: {why}")
    if newest_usable(store) is None:
        lines.append(f"no checkpoint in {store} verifies: this variant starts again from step 0")
    for line in lines:
        log.warning("%s", line)
    return lines


def read(directory: Path, rank: int, map_location="cpu") -> tuple[dict, dict | None]:
    """The shared state (state.pt) and this rank's RNG state (None when the rank did not exist
    then). The model and optimizer are loaded by ``load``."""
    verify(directory)
    state = safe_load.load(directory / STATE_FILE, map_location=map_location)
    rng_file = directory / f"rng_rank{rank}.pt"
    rng = safe_load.load(rng_file) if rng_file.is_file() else None
    return state, rng


def load(directory: Path, model: torch.nn.Module, optimizer, state: dict | None = None) -> None:
    """Load a checkpoint's model and optimizer: a DCP one of either strategy (collective; resharded
    when written by another number of workers or strategy), or one of ddp's earlier layout from
    its ``state`` (state.pt; the optimizer's state indexed as ``Optimizer.state_dict`` has it)."""
    module, inner = master_weights.stateful(model, optimizer)
    if is_sharded(directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = sharded_state(model, optimizer)
        reader = safe_load.Reader(str(directory / DCP_DIR))
        _check_fits(reader, sd["model"])
        dcp.load(sd, storage_reader=reader, planner=safe_load.Planner())
        set_state_dict(module, inner, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    else:
        module.load_state_dict(state["model"])
        inner.load_state_dict(state["optimizer"])


def _check_fits(reader, model_sd: dict) -> None:
    """Raise as ``load_state_dict`` does (``STATE_DICT_MISMATCH``) unless the checkpoint's model has
    ``model_sd``'s names and shapes (a DTensor's is the whole tensor's): DCP would load a larger
    model's checkpoint in part without a word."""
    meta = reader.read_metadata().state_dict_metadata
    saved = {key.removeprefix("model."): tuple(m.size) for key, m in meta.items() if key.startswith("model.")}
    ours = {key: tuple(t.shape) for key, t in model_sd.items()}
    wrong = [f"{key}: {saved.get(key, 'absent')} in the checkpoint, {ours.get(key, 'absent')} in the model"
             for key in sorted(saved.keys() | ours.keys()) if saved.get(key) != ours.get(key)]
    if wrong:
        raise RuntimeError(f"{STATE_DICT_MISMATCH}: size mismatch for " + "; ".join(wrong))


def sharded_state(model: torch.nn.Module, optimizer) -> dict:
    """What the ranks save into ``dcp/``: the model's and optimizer's state dicts as
    ``get_state_dict`` keys them (by parameter name, alike under ddp and fsdp), of the fp32
    masters where the weights are bf16. Under ddp each rank saves its ``replica_share``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(*master_weights.stateful(model, optimizer))
    return {"model": model_sd, "optimizer": optim_sd}


def replica_share(sd: dict, rank: int, world: int) -> dict:
    """The part of ``sd`` that ``rank`` saves where every rank holds all of it (ddp): each
    parameter with its optimizer state on one rank, the ranks' bytes balanced. DCP's save plan
    would write each tensor once anyway (``dedup_save_plans``), but every rank would copy all of
    it into CPU memory for an asynchronous save; this way each copies about 1/world."""
    largest_first = sorted(sd["model"], key=lambda key: -tensor_bytes(sd["model"][key]))  # alike on every rank
    owner = {key: i % world for i, key in enumerate(largest_first)}
    state = {k: v for k, v in sd["optimizer"]["state"].items() if owner[k] == rank}
    return {"model": {k: t for k, t in sd["model"].items() if owner[k] == rank},
            "optimizer": {**sd["optimizer"], "state": state}}


def load_model_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model's weights in a checkpoint of either layout, as full CPU tensors keyed like
    ``Transformer.state_dict()``, from a checkpoint ``verify`` passed. Needs no process group
    (for export and inspection)."""
    directory = Path(checkpoint_dir)
    if not is_sharded(directory):
        return dict(safe_load.load(directory / STATE_FILE)["model"])
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = safe_load.Reader(str(directory / DCP_DIR))
    meta = reader.read_metadata().state_dict_metadata
    # Allocate only the model's tensors, as the metadata describes them: the optimizer state
    # in the same checkpoint is never read.
    model = {key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for key, m in meta.items() if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    sd = {"model": model}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(sd, storage_reader=reader, planner=safe_load.Planner(), no_dist=True)
    return sd["model"]
