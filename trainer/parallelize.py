"""The model's build that every parallelism (``trainer/parallel/``: DDP replicates the model,
FSDP2 shards each block) shares. The model file knows nothing of this, as in
torchtitan's ``parallelize_llama``: ``torch.compile`` per block, then ``fully_shard`` per block
and on the root, in that order. Activation checkpointing is the model's own (``Block.forward``),
so the recompute sits inside the compiled block and FSDP's hooks outside it.

Both strategies build the model on the meta device, materialise it on the worker's device
(``to_empty``) and replay the model's own init there (``init_replayed``): on a GPU no weight is
drawn on the CPU, and FSDP holds no more than one full parameter besides its shards (the 8B
model's embedding, 2 GB in fp32). So for the same seed and kind of device the two strategies
start from the same weights, bit for bit, on any number of workers (docs/performance.md). (A
CUDA generator's numbers depend on the GPU model, its count of multiprocessors included.)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from trainer import compile_cache, master_weights
from trainer.model import AttnFn, ModelArgs, Transformer


def compile_blocks(model: Transformer) -> None:
    """torch.compile each transformer block in place (names, and so state dicts, unchanged).

    Per block rather than the whole model: DDP's bucket hooks and FSDP's all-gathers stay
    outside the compiled graphs, so communication still overlaps the backward pass, and one
    compiled graph serves every block (two when every Nth block is checkpointed: with and
    without the recompute).
    """
    # Under DDP, dynamo's DDPOptimizer would split each compiled block at bucket boundaries
    # (3 graphs per block of the 0.95B config); a block is already the unit of overlap here.
    # Measured: docs/benchmarks-log/2026-11.md (2026-11-28).
    torch._dynamo.config.optimize_ddp = False
    compile_cache.enable()  # before the first compile: a later run of the same shapes reuses it
    for block in model.layers:
        block.compile(dynamic=False)  # shapes are fixed per run


def compile_whole(model: nn.Module) -> None:
    """torch.compile the whole forward, embedding to loss, in place (names, and so state dicts,
    unchanged): ``train.compile_mode`` reduce-overhead (``compile_mode.whole_model``), whose step
    is then a few CUDA-graph replays instead of one per block and the eager rest between them.
    ``model`` is the Transformer, or its DDP wrapper: dynamo's DDPOptimizer then splits the graph
    at DDP's buckets, so each bucket's all-reduce still overlaps the rest of the backward."""
    torch._dynamo.config.optimize_ddp = True  # (compile_blocks turns it off: a block is its own unit there)
    compile_cache.enable()
    model.compile(dynamic=False)


def set_attention(model: Transformer, attn_fn: AttnFn) -> None:
    """Every block's attention kernel, in a model built with another (``attention.unresolved``);
    before its first forward, where the compiled blocks trace it."""
    for block in model.layers:
        block.attn.attn_fn = attn_fn


def build_replica(args: ModelArgs, attn_fn: AttnFn, *, device: torch.device, seed: int, compile: bool,
                  init_weights: Optional[Callable[[], dict]] = None, float8: Optional[str] = None,
                  param_dtype: torch.dtype = torch.float32) -> Transformer:
    """The whole model on this device, as DDP replicates it: built on meta, allocated here, the
    seeded init replayed (or ``init_weights`` loaded), parameters cast to ``param_dtype``, blocks
    compiled; not yet wrapped (DDP's buckets take the parameters' dtype)."""
    raw = on_meta(args, attn_fn, device=device, float8=float8)
    raw.to_empty(device=device)
    raw.tie_weights()
    init_replayed(raw, device, seed)
    if init_weights is not None:  # a checkpoint to resume from, if any, replaces these weights later
        raw.load_state_dict(init_weights())
    master_weights.cast_parameters(raw, param_dtype)  # after the fp32 init: the masters start from its rounding
    if compile:
        compile_blocks(raw)
    return raw


def on_meta(args: ModelArgs, attn_fn: AttnFn, *, device: torch.device, float8: Optional[str]) -> Transformer:
    """The model's structure without memory or init; float8 swaps its Linear layers first, so
    the init is replayed into the layers that train."""
    with torch.device("meta"):
        model = Transformer(args, attn_fn)
    if float8:
        from trainer import float8 as float8_mod

        float8_mod.convert(model, device, float8)
    return model


@torch.no_grad()
def init_replayed(model: Transformer, device: torch.device, seed: int) -> None:
    """Fill a materialised model's parameters (plain or FSDP shards) with exactly what
    ``Transformer(args)`` draws, the same parameters, order and stds, from a generator on
    ``device`` seeded with ``seed``; and compute its rotary tables."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            # Every rank draws the same full tensor on its device and keeps its slice: no
            # communication, and the full tensor is freed before the next one is drawn.
            full = torch.empty(param.shape, dtype=param.dtype, device=device)
            model.draw_init(name, full, gen)
            param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements,
                                                     src_data_rank=None).to_local())
            del full
        else:
            model.draw_init(name, param, gen)
    model.compute_buffers()
