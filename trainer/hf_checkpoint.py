"""Hugging Face Llama directories on disk: ``config.json`` plus ``model.safetensors`` or shards
with ``model.safetensors.index.json``. Written by ``orchestrator export``; read for
``model.init_from`` (checked by the driver before launch, loaded by every worker).

safetensors: the format transformers, vLLM and llama.cpp converters read; it memory-maps, and
its headers give names and shapes without reading the tensors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from trainer import finite, hf_convert
from trainer.hf_convert import NotLlama
from trainer.model_args import ModelArgs

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size


# ---------------------------------------------------------------- reading


def read_config(path: Path) -> dict:
    """config.json of an HF directory; raises NotLlama naming the file."""
    if not path.is_dir():
        raise NotLlama(f"{path}: not a directory (expected a Hugging Face Llama checkpoint)")
    cfg_path = path / CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise NotLlama(f"{cfg_path}: missing (expected a Hugging Face Llama checkpoint)") from None
    except (OSError, ValueError) as e:
        raise NotLlama(f"{cfg_path}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise NotLlama(f"{cfg_path}: expected a JSON object")
    return cfg


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise NotLlama(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise NotLlama(f"{path / missing[0]}: shard named in {INDEX_FILE} is missing")
        return [path / f for f in files]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    raise NotLlama(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read)")


# Weights a model can train from; an integer or bool tensor would be cast without a word.
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor, from the safetensors headers alone; NotLlama for a
    tensor that is not floating point."""
    from safetensors import safe_open

    shapes, dtypes = {}, {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    info = st.get_slice(name)
                    shapes[name], dtypes[name] = tuple(info.get_shape()), (info.get_dtype(), f)
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise NotLlama(f"{f}: not a safetensors file ({e})") from None
    for name, (dtype, f) in dtypes.items():
        if dtype not in FLOAT_DTYPES:
            raise NotLlama(f"{f}: tensor {name} has dtype {dtype}; expected floating point ({', '.join(FLOAT_DTYPES)})")
    return shapes


def model_fields(path: Path) -> dict:
    """The ``ModelConfig`` fields of the HF Llama at ``path``, after checking that its
    tensors are all there with the shapes its config implies. Raises NotLlama naming the path."""
    cfg = read_config(path)
    try:
        fields = hf_convert.model_fields(cfg)
    except NotLlama as e:
        raise NotLlama(f"{path / CONFIG_FILE}: {e}") from None
    shapes = tensor_shapes(path)
    try:
        hf_convert.check_hf_shapes(shapes, ModelArgs(max_seq_len=1, **fields))
    except NotLlama as e:
        raise NotLlama(f"{path}: {e}") from None
    return fields


def load_state_dict(path: str | Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The weights at ``path`` as a full state dict in our names and layouts, on CPU, for
    ``Transformer.load_state_dict`` (or DCP's ``set_model_state_dict`` with full_state_dict)."""
    from safetensors.torch import load_file

    path = Path(path)
    hf = {}
    for f in _weight_files(path):
        hf.update(load_file(str(f), device="cpu"))
    ruined = finite.non_finite(hf)
    if ruined:  # a ValueError: the worker fails at once, not retried (trainer/failures.py)
        raise ValueError(f"{path}: {ruined}; these weights cannot be trained from")
    try:
        return hf_convert.from_hf_state_dict(hf, args)
    except NotLlama as e:
        raise NotLlama(f"{path}: {e}") from None


# ---------------------------------------------------------------- writing


def shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors packed in order into shards of at most ``max_shard_bytes`` (a bigger tensor
    gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save(directory: Path, state: dict[str, torch.Tensor], args: ModelArgs, *, eos_id: int,
         max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write config.json and the weights of our ``state`` into ``directory`` (which exists);
    returns the file names written."""
    from safetensors.torch import save_file

    hf = hf_convert.to_hf_state_dict(state, args)
    dtypes = {t.dtype for t in hf.values()}
    dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    (directory / CONFIG_FILE).write_text(json.dumps(hf_convert.hf_config(args, eos_id=eos_id, torch_dtype=dtype),
                                                    indent=2) + "\n")
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    shards = shard(hf, max_shard_bytes)
    if len(shards) == 1:
        save_file(hf, str(directory / WEIGHTS_FILE), metadata=meta)
        return [CONFIG_FILE, WEIGHTS_FILE]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, part in zip(names, shards):
        save_file(part, str(directory / name), metadata=meta)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")
    return [CONFIG_FILE, INDEX_FILE, *names]
