"""How the model is spread over the workers: DDP (every worker holds the whole model) or FSDP2
(every worker holds a shard of each block). The model file knows nothing of this, as in
torchtitan's ``parallelize_llama``: ``torch.compile`` per block, then ``fully_shard`` per block
and on the root, in that order. Activation checkpointing is the model's own
(``train.activation_checkpointing``: ``Transformer.forward`` recomputes each block, so it sits
outside the compiled block and FSDP's unshard hooks run again for the recompute).

Both strategies start from the same weights for the same seed. DDP builds the model on the CPU
under ``torch.manual_seed(seed)``, as before. FSDP builds it on the meta device (no memory),
shards it, allocates only the local shards, and then replays the model's own init
(``Transformer.init_plan``) with the same seeded CPU generator: each parameter is drawn in full,
one at a time, and each rank keeps its slice. So no process ever holds more than one full
parameter (the largest, the 8B model's embedding, is 2 GB in fp32), and the weights are those
of ``Transformer(args)`` under the same seed, bit for bit.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from trainer import compile_cache
from trainer.model import AttnFn, ModelArgs, Transformer, rotary_tables

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
    compiled graph serves every block.
    """
    compile_cache.enable()  # before the first compile: a later run of the same shapes reuses it
    for block in model.layers:
        block.compile(dynamic=False)  # shapes are fixed per run


def build(args: ModelArgs, attn_fn: AttnFn, *, strategy: Strategy, device: torch.device, seed: int,
          compile: bool, world_size: int, init_weights: Optional[Callable[[], dict]] = None,
          float8: bool = False) -> tuple[nn.Module, Transformer]:
    """(the model to train, the plain Transformer inside it) for this worker.

    ``init_weights`` gives a full state dict to start from (``model.init_from``) instead of the
    seeded init; under fsdp only rank 0 reads it and broadcasts the shards. ``float8`` converts
    the Linear layers (``trainer/float8.py``) before compile and sharding.
    """
    if strategy == "fsdp":
        check_shardable(args, world_size)
        model = _build_fsdp(args, attn_fn, device=device, seed=seed, compile=compile, float8=float8)
        if init_weights is not None:
            _load_full_state(model, init_weights)
        return model, model
    torch.manual_seed(seed)  # same seed on every rank and variant: same initial weights
    raw = Transformer(args, attn_fn)
    if init_weights is not None:  # a checkpoint to resume from, if any, replaces these weights later
        raw.load_state_dict(init_weights())
    if float8:
        from trainer import float8 as float8_mod

        float8_mod.convert(raw, device)
    if compile:
        compile_blocks(raw)
    return _wrap_ddp(raw, device), raw


def _load_full_state(model: nn.Module, full_state: Callable[[], dict]) -> None:
    """A full (unsharded) state dict into a sharded model: rank 0 reads it, every rank keeps its shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = full_state() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _wrap_ddp(model: Transformer, device: torch.device) -> nn.Module:
    import ray.train.torch  # [ray]

    on_gpu = device.type == "cuda"
    model = ray.train.torch.prepare_model(  # [ray] moves to the device, wraps in DDP when world > 1
        model, parallel_strategy_kwargs={"bucket_cap_mb": DDP_BUCKET_MB, "gradient_as_bucket_view": True})
    if on_gpu and isinstance(model, nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        # Gradients cross the wire in bf16: half the bytes of the fp32 all-reduce; the
        # optimizer still sees fp32 (averaged in fp32 after decompression).
        model.register_comm_hook(None, bf16_compress_hook)
    return model


def mixed_precision(device: torch.device):
    """bf16 parameters and compute on GPU, gradients reduced in fp32; plain fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _build_fsdp(args: ModelArgs, attn_fn: AttnFn, *, device: torch.device, seed: int, compile: bool,
                float8: bool = False) -> Transformer:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = Transformer(args, attn_fn)
    if float8:
        from trainer import float8 as float8_mod

        float8_mod.convert(model, device)
    # Activation checkpointing is the model's own (per block, args.activation_checkpointing).
    if compile:
        compile_blocks(model)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mp = mixed_precision(device)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block is gathered again at once by the backward pass: keep it unsharded.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    init_sharded(model, seed)
    return model


@torch.no_grad()
def init_sharded(model: Transformer, seed: int) -> None:
    """Fill the local shards with exactly what ``Transformer(args)`` draws after
    ``torch.manual_seed(seed)``: the same parameters, order and stds (``Transformer.init_std``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        std = model.init_std(name, param)
        full = torch.empty(param.shape, dtype=torch.float32)
        full.fill_(1.0) if std is None else full.normal_(0.0, std, generator=gen)
        if isinstance(param, DTensor):
            # Every rank drew the same full tensor: each keeps its slice, no communication.
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(full.to_local())
        else:
            param.copy_(full)
    # Non-persistent buffers are not in any checkpoint: compute them for real.
    cos, sin = rotary_tables(model.args.head_dim, model.args.max_seq_len, model.args.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(model.rope_cos.device), sin.to(model.rope_sin.device)
