"""How the model is spread over the workers: DDP (every worker holds the whole model) or FSDP2
(every worker holds a shard of each block). The model file knows nothing of this, as in
torchtitan's ``parallelize_llama``: ``torch.compile`` per block, then ``fully_shard`` per block
and on the root, in that order. Activation checkpointing is the model's own
(``train.activation_checkpointing``: each checkpointed block, every block or every Nth,
recomputes itself in ``Block.forward``, so the recompute sits inside the compiled block and
FSDP's hooks outside it).

Both strategies build the model on the meta device (no memory, no init), materialise it on the
worker's device (``to_empty``) and then replay the model's own init (``Transformer.draw_init``,
in ``named_parameters()`` order) with a generator on that device seeded with ``seed``: on a GPU
every weight is drawn by the GPU, none on the CPU. DDP draws straight into its parameters;
FSDP (sharded first) draws each full parameter, one at a time, keeps its slice and frees the
rest, so no process holds more than one full parameter besides its shards (the largest, the 8B
model's embedding, is 2 GB in fp32). Hence for the same seed and device the two strategies start
from the same weights, bit for bit, on any number of workers; on the CPU those are the weights
of ``Transformer(args)`` under ``torch.manual_seed(seed)``. (A CUDA generator's numbers depend
on the GPU model, its count of multiprocessors included: the same seed gives the same weights on
the same kind of GPU, other weights on another kind or on the CPU.)
"""

from __future__ import annotations

import inspect
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from trainer import compile_cache, master_weights
from trainer.model import AttnFn, ModelArgs, Transformer

Strategy = Literal["ddp", "fsdp"]
# DDP all-reduce bucket: fewer, larger all-reduces than the 25 MB default (torchtitan's choice).
DDP_BUCKET_MB = 100


class ShardingError(ValueError):
    """The model cannot be sharded sensibly over this many workers."""


def check_shardable(args: ModelArgs, world_size: int) -> None:
    """Raise ShardingError when FSDP would leave some worker with an empty shard.

    FSDP2 splits every parameter along its first dimension; a dimension smaller than the
    number of workers gives some workers nothing to hold, which is at best pointless and on
    some versions a collective that never completes.
    """
    rows = {"model.dim (norm weights, wo/w2 rows)": args.dim,
            "n_kv_heads * head_dim (wk/wv rows)": args.n_kv_heads * args.head_dim,
            "model.ffn_hidden (w1/w3 rows)": args.ffn_hidden,
            "model.vocab_size (embedding rows)": args.vocab_size}
    small = {name: n for name, n in rows.items() if n < world_size}
    if small:
        worst = ", ".join(f"{name} = {n}" for name, n in small.items())
        raise ShardingError(f"scaling.strategy fsdp over {world_size} workers needs every parameter's first "
                            f"dimension to be at least {world_size}; {worst}: use ddp or fewer workers")


def compile_blocks(model: Transformer) -> None:
    """torch.compile each transformer block in place (names, and so state dicts, unchanged).

    Per block rather than the whole model: DDP's bucket hooks and FSDP's all-gathers stay
    outside the compiled graphs, so communication still overlaps the backward pass, and one
    compiled graph serves every block (two when every Nth block is checkpointed: with and
    without the recompute).
    """
    # Under DDP, dynamo's DDPOptimizer would split each compiled block at bucket boundaries
    # (3 graphs per block of the 0.95B config); a block is already the unit of overlap here.
    # 2x H200, 0.95B, 2 workers: 152,364 tok/s without the split vs 149,771 with it (two
    # machines of the same kind, not one: docs/BENCHMARKS.md, 2026-11-28).
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


def build(args: ModelArgs, attn_fn: AttnFn, *, strategy: Strategy, device: torch.device, seed: int,
          compile: bool, world_size: int, init_weights: Optional[Callable[[], dict]] = None,
          float8: Optional[str] = None, whole_graph: bool = False,
          param_dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Transformer]:
    """(the model to train, the plain Transformer inside it) for this worker.

    ``init_weights`` gives a full state dict to start from (``model.init_from``) instead of the
    seeded init; under fsdp only rank 0 reads it and broadcasts the shards. ``float8``, a recipe
    (train.float8_recipe) or None, converts the Linear layers (``trainer/float8.py``) before
    compile and sharding. ``whole_graph`` (with ``compile``) compiles the whole model as one graph
    (``compile_whole``) instead of each block; fsdp ignores it (``compile_mode.whole_model``).
    ``param_dtype`` (``train.param_dtype``, resolved): the weights' dtype in forward and backward;
    DDP's parameters are cast to it (the optimizer keeps fp32 masters: trainer/master_weights.py),
    FSDP gathers its fp32 shards in it.
    """
    if strategy == "fsdp":
        check_shardable(args, world_size)
        model = _build_fsdp(args, attn_fn, device=device, seed=seed, compile=compile, float8=float8,
                            param_dtype=param_dtype)
        if init_weights is not None:
            _load_full_state(model, init_weights)
        return model, model
    raw = build_replica(args, attn_fn, device=device, seed=seed, compile=compile and not whole_graph,
                        init_weights=init_weights, float8=float8, param_dtype=param_dtype)
    model = _wrap_ddp(raw, device)
    if compile and whole_graph:
        compile_whole(model)  # the DDP wrapper where there is one (its buckets split the graph)
    return model, raw


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
    raw = _on_meta(args, attn_fn, device=device, float8=float8)
    raw.to_empty(device=device)
    raw.tie_weights()
    init_replayed(raw, device, seed)
    if init_weights is not None:  # a checkpoint to resume from, if any, replaces these weights later
        raw.load_state_dict(init_weights())
    master_weights.cast_parameters(raw, param_dtype)  # after the fp32 init: the masters start from its rounding
    if compile:
        compile_blocks(raw)
    return raw


def _on_meta(args: ModelArgs, attn_fn: AttnFn, *, device: torch.device, float8: Optional[str]) -> Transformer:
    """The model's structure without memory or init; float8 swaps its Linear layers first, so
    the init is replayed into the layers that train."""
    with torch.device("meta"):
        model = Transformer(args, attn_fn)
    if float8:
        from trainer import float8 as float8_mod

        float8_mod.convert(model, device, float8)
    return model


def _load_full_state(model: nn.Module, full_state: Callable[[], dict]) -> None:
    """A full (unsharded) state dict into a sharded model: rank 0 reads it, every rank keeps its shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = full_state() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def ddp_options() -> dict:
    """DistributedDataParallel's arguments: 100 MB buckets, gradients as views of them, and no
    broadcast of the buffers before every forward: the only buffers are the rotary tables,
    computed alike on every rank, and the broadcast would be a collective (a wait for the
    other ranks) at the start of every step. torch 2.13 renamed the switch."""
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return {"bucket_cap_mb": DDP_BUCKET_MB, "gradient_as_bucket_view": True, **no_sync}


def _wrap_ddp(model: Transformer, device: torch.device) -> nn.Module:
    import ray.train.torch  # [ray]

    # Gradients are all-reduced in fp32, overlapped with the backward pass. A bf16 compression
    # hook halves the bytes but adds a cast before and after every bucket on the compute
    # stream; over NVLink that cost more than it saved (2x H200, 0.95B, 2 workers: 153,692
    # tok/s in fp32 vs 149,771 with the hook, on two machines of the same kind, not one).
    return ray.train.torch.prepare_model(  # [ray] a no-op move (built on the device), DDP when world > 1
        model, parallel_strategy_kwargs=ddp_options())


def mixed_precision(param_dtype: torch.dtype):
    """FSDP2's policy: the fp32 shards gathered in ``param_dtype`` (bf16 on GPU by default:
    ``train.param_dtype`` auto), gradients reduced in fp32; plain fp32 when ``param_dtype`` is."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype != torch.float32:
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _build_fsdp(args: ModelArgs, attn_fn: AttnFn, *, device: torch.device, seed: int, compile: bool,
                float8: Optional[str] = None, param_dtype: torch.dtype = torch.float32) -> Transformer:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _on_meta(args, attn_fn, device=device, float8=float8)
    # Activation checkpointing is the model's own (per block, args.activation_checkpointing).
    if compile:
        compile_blocks(model)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mp = mixed_precision(param_dtype)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block is gathered again at once by the backward pass: keep it unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    init_replayed(model, device, seed)
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
