"""FSDP2: every worker holds a shard of each block and of the root (``fully_shard`` per block,
then on the root, after ``torch.compile`` per block, as torchtitan's ``parallelize_llama``). The
model is built on the meta device, sharded, materialised on the worker's device and the seeded
init replayed shard by shard (``trainer.parallelize.init_replayed``).

Memory: 1/world of the fp32 parameters, gradients and AdamW moments, plus what FSDP2 gathers
in ``train.param_dtype``: the root's parameters (embedding, final norm, head: the root is not
resharded between forward and backward) and two blocks' (the one computing and the one
prefetched), and, at the end of backward, the root's unsharded gradients with their fp32 copy
for the reduce-scatter.
"""

from __future__ import annotations

from contextlib import contextmanager

from trainer.parallel import FP32, StateBytes, Strategy

# FSDP2 gathers the unit computing now and prefetches the next one.
UNITS_IN_FLIGHT = 2


class ShardingError(ValueError):
    """The model cannot be sharded sensibly over this many workers."""


def check_shardable(args, world_size: int) -> None:
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


def mixed_precision(param_dtype):
    """FSDP2's policy: the fp32 shards gathered in ``param_dtype`` (bf16 on GPU by default:
    ``train.param_dtype`` auto), gradients reduced in fp32; plain fp32 when ``param_dtype`` is (or None)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype not in (None, torch.float32):
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def cudagraphs_refusal(mode: str) -> str:
    """Why ``mode``'s CUDA graphs and FSDP do not go together, as the plan's refusal
    (``orchestrator.run.cudagraphs_refusal``) and the worker's backstop both say it."""
    return (f"train.compile_mode {mode} (CUDA graphs) does not work with scaling.strategy fsdp: FSDP gathers each "
            f"block's weights into new memory every step, where a graph replays the addresses it recorded")


class FSDP(Strategy):
    name = "fsdp"
    shards = True

    def weights_dtype(self, precision):
        # FSDP2's mixed precision gathers in bf16 when computing in bf16; its fp32 shards are the masters.
        return "bf16" if precision == "bf16" else "fp32"

    def compiles_whole(self):
        return False  # FSDP's hooks sit between the blocks: each compiles on its own

    def refusal(self, train, *, cudagraphs):
        return cudagraphs_refusal(train.compile_mode) if cudagraphs else None

    def state_bytes(self, params, block, root, *, world_size, weights):
        # The root's gradients come last, when every sharded gradient is there and the
        # activations are gone: unsharded in param_dtype, plus the fp32 copy that mixed
        # precision reduce-scatters. A block's own, reduced while backward goes on, trade
        # places with its activations.
        return StateBytes(params=FP32 * params // world_size, grads=FP32 * params // world_size,
                          optimizer=2 * FP32 * params // world_size,
                          gathered=(root + UNITS_IN_FLIGHT * block) * weights,
                          reduce=root * (weights + (FP32 if weights != FP32 else 0)), shard=world_size)

    def build(self, args, attn_fn, *, device, seed, compile, world_size, init_weights=None, float8=None,
              whole_graph=False, param_dtype=None):
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from trainer import parallelize

        check_shardable(args, world_size)
        model = parallelize.on_meta(args, attn_fn, device=device, float8=float8)
        if compile:
            parallelize.compile_blocks(model)
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        mp = mixed_precision(param_dtype)
        n = len(model.layers)
        for i, block in enumerate(model.layers):
            # The last block is gathered again at once by the backward pass: keep it unsharded.
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.to_empty(device=device)
        parallelize.init_replayed(model, device, seed)
        if init_weights is not None:
            _load_full_state(model, init_weights)
        return model, model

    def no_sync(self, model):
        return _no_sync(model)


@contextmanager
def _no_sync(model):
    model.set_requires_gradient_sync(False)  # the flag holds until set again
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _load_full_state(model, full_state) -> None:
    """A full (unsharded) state dict into a sharded model: rank 0 reads it, every rank keeps its shards."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = full_state() if dist.get_rank() == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
