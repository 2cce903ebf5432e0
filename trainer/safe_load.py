"""Reading checkpoint files as data only: nothing in a checkpoint can run code when it is loaded.

A checkpoint's SHA-256 manifests catch damage, not malice: whoever can write the run
directory can rewrite them. So every pickle in a checkpoint is read with an unpickler that
builds plain data and refuses any other global: ``torch.load(weights_only=True)`` for
``state.pt``, the RNG files and DCP's non-tensor items, and an allowlist of DCP's own
dataclasses for DCP's ``.metadata`` (which torch reads with a bare ``pickle.load``).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path, PosixPath

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo


class UnsafeFile(pickle.UnpicklingError):
    """A checkpoint file that holds more than data (a pickled object that would run code)."""

    def __init__(self, path: Path | str, why: str):
        super().__init__(f"{path}: refused, it holds more than plain data ({why})")


# Checkpoints written before the RNG state was stored as lists hold numpy's key array; these
# rebuild a uint32 ndarray and nothing else. numpy 1 and 2 name the rebuilding function apart.
_reconstruct = np.zeros(0).__reduce__()[0]
_LEGACY_NUMPY = [np.ndarray, np.dtype, np.dtypes.UInt32DType, (_reconstruct, "numpy.core.multiarray._reconstruct"),
                 (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _why(e: Exception) -> str:
    """The line of torch's long weights_only message that names the refused global."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else type(e).__name__)


def load(path: Path, map_location="cpu", mmap: bool = False):
    """``torch.load`` of a checkpoint file, data only; UnsafeFile when it holds anything else."""
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeFile(path, _why(e)) from None


# Exactly the globals DCP's FileSystemWriter pickles into .metadata (torch 2.13), by name:
# pickle resolves dotted names, so a module allowed as a whole would let "torch.load" through.
_METADATA_GLOBALS = {("torch", "Size"): torch.Size, ("pathlib", "PosixPath"): PosixPath,
                     ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo}
_METADATA_GLOBALS.update({("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _METADATA_GLOBALS.get((module, name))
        if found is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise pickle.UnpicklingError(f"unsupported global {module}.{name}")
        return found


def _data(blob: io.BytesIO, where: Path | str):
    try:
        return torch.load(blob, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFile(where, _why(e)) from None


class Reader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read as data only (tensors it already reads so)."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                meta = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise UnsafeFile(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        if not isinstance(meta, dcp_metadata.Metadata):
            raise UnsafeFile(path, f"a {type(meta).__name__}, not DCP metadata")
        if meta.storage_meta is None:
            meta.storage_meta = dcp_metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class Planner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor items (optimizer hyperparameters) read as data only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = _data(value, f"DCP item {read_item.dest_index.fqn}")
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes stores it
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def check_dcp(directory: Path) -> None:
    """Raise UnsafeFile unless DCP's ``.metadata`` and every non-tensor item are plain data;
    reads the metadata and the small items only, no tensor."""
    reader = Reader(str(directory))
    meta = reader.read_metadata()
    for fqn, item in meta.state_dict_metadata.items():
        if isinstance(item, dcp_metadata.BytesStorageMetadata):
            info = meta.storage_data[dcp_metadata.MetadataIndex(fqn)]
            with open(directory / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = io.BytesIO(f.read(info.length))
            _data(blob, directory / info.relative_path)
