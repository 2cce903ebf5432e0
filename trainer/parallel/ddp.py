"""DDP: every worker holds the whole model and all-reduces the gradients, overlapped with the
backward pass (torch's ``DistributedDataParallel``, as Ray's ``prepare_model`` wraps it).

Memory: fp32 parameters, gradients and AdamW's two moments on every worker, 16 bytes per
parameter; DDP's buckets are the gradients themselves (``gradient_as_bucket_view``), resident for
the whole run once there are several workers. With ``train.param_dtype`` bf16 the parameters and
gradients are bf16 beside the fp32 masters (6 + 2 + 8 bytes per parameter), and at the step the
masters' fp32 gradients add 4 more (``trainer/master_weights.py``).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

from trainer.parallel import BF16, FP32, StateBytes, Strategy

# DDP all-reduce bucket: fewer, larger all-reduces than the 25 MB default (torchtitan's choice).
BUCKET_MB = 100


def options() -> dict:
    """DistributedDataParallel's arguments: 100 MB buckets, gradients as views of them, and no
    broadcast of the buffers before every forward: the only buffers are the rotary tables,
    computed alike on every rank, and the broadcast would be a collective (a wait for the
    other ranks) at the start of every step. torch 2.13 renamed the switch."""
    import torch.nn as nn

    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return {"bucket_cap_mb": BUCKET_MB, "gradient_as_bucket_view": True, **no_sync}


class DDP(Strategy):
    name = "ddp"
    shards = False

    def state_bytes(self, params, block, root, *, world_size, weights):
        if weights == BF16:
            return StateBytes(params=(BF16 + FP32) * params, grads=BF16 * params, optimizer=2 * FP32 * params,
                              step=FP32 * params, grads_resident=world_size > 1)
        # Ray wraps the model in DDP only for several workers (prepare_model).
        return StateBytes(params=FP32 * params, grads=FP32 * params, optimizer=2 * FP32 * params,
                          grads_resident=world_size > 1)

    def build(self, args, attn_fn, *, device, seed, compile, world_size, init_weights=None, float8=None,
              whole_graph=False, param_dtype=None):
        import torch

        from trainer import parallelize

        raw = parallelize.build_replica(args, attn_fn, device=device, seed=seed, compile=compile and not whole_graph,
                                        init_weights=init_weights, float8=float8,
                                        param_dtype=param_dtype or torch.float32)
        model = self.wrap(raw, device, world_size)
        if compile and whole_graph:
            parallelize.compile_whole(model)  # the DDP wrapper where there is one (its buckets split the graph)
        return model, raw

    @staticmethod
    def wrap(model, device, world_size: int):
        """DDP over several workers, as Ray's ``prepare_model`` wraps it; one worker trains the model itself."""
        if world_size == 1:
            return model
        import torch.nn as nn

        # Gradients are all-reduced in fp32, overlapped with the backward pass. A bf16 compression
        # hook halves the bytes but adds a cast before and after every bucket on the compute
        # stream; over NVLink that cost more than it saved (docs/benchmarks-log/2026-11.md).
        on_gpu = {"device_ids": [device], "output_device": device} if device.type == "cuda" else {}
        return nn.parallel.DistributedDataParallel(model, **on_gpu, **options())

    def no_sync(self, model):
        return model.no_sync() if hasattr(model, "no_sync") else nullcontext()  # one worker: nothing to sync
