"""One optimizer step, shared by the Ray worker loop and the bare-process benchmark, so the
two time the same code. Nothing in a step waits on the GPU: batches go up from pinned memory
without blocking, and the loss stays on the device until the caller asks for it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import numpy as np
import torch

from trainer import compile_cache
from trainer.config import TrainConfig
from trainer.master_weights import MasterWeights


def training_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``tc.precision`` on ``device``."""
    return torch.bfloat16 if tc.precision(device.type) == "bf16" else torch.float32


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    # Contiguous first: a batch is a strided view (inputs and targets share their rows), pinning
    # keeps the strides, and a strided source is copied again, into pageable memory, for the transfer.
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        # A copy from pageable memory makes the host wait for the stream; pinned does not.
        return t.pin_memory().to(device, non_blocking=True)
    return t


class Stepper:
    """Forward and backward over ``grad_accum`` micro-batches, clip, AdamW step (on fp32 master
    copies where the weights are bf16: ``trainer.master_weights.MasterWeights``).

    ``model`` is what a strategy's ``build`` returned (blocks already compiled when compile is
    on): plain, DDP-wrapped or FSDP-sharded.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 dtype: torch.dtype, grad_accum: int, grad_clip: float, compiled: bool = False,
                 cudagraphs: bool = False, no_sync: Callable[[torch.nn.Module], ContextManager] | None = None):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.compiled = compiled  # blocks compiled (trainer/parallelize.py): the compile cache's artifacts apply
        self.compile_artifacts = None  # the mega-cache file, known at the first step (its shapes)
        self.cudagraphs = cudagraphs  # the compiled model replays as CUDA graphs (train.compile_mode)
        self.optimizer, self.device, self.dtype = optimizer, device, dtype
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        # The strategy's (trainer/parallel/): backward reduces gradients across workers only on
        # the last micro-step of an optimizer step. None: a model with nothing to reduce.
        self.no_sync = no_sync or (lambda model: nullcontext())
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def __call__(self, batches: list[tuple[np.ndarray, np.ndarray]], lr: float, *,
                 before_sync: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean loss, grad norm) as device tensors. ``before_sync`` is called before the
        last micro-step's backward, where the gradients' reduction across workers begins."""
        if self.cudagraphs:
            # A new step for the graphs: what the last step's replays returned is no longer read, so
            # the next replays may overwrite it (its gradients went with the optimizer's zero_grad).
            torch.compiler.cudagraph_mark_step_begin()
        first_compile = self.compiled and self.compile_artifacts is None
        if first_compile:
            self.compile_artifacts = compile_cache.artifacts_path(f"{self.model!r} {batches[0][0].shape} {self.dtype}")
            compile_cache.load_artifacts(self.compile_artifacts)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batches):
            x, y = to_device(x, self.device), to_device(y, self.device)
            last = micro == len(batches) - 1
            with nullcontext() if last else self.no_sync(self.model):
                with self.autocast:
                    _, loss = self.model(x, y)
                if last:
                    before_sync()
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        # bf16 weights (train.param_dtype): their gradients move to the fp32 masters, which are clipped
        clipped = self.optimizer.take_grads() if isinstance(self.optimizer, MasterWeights) else self.params
        grad_norm = torch.nn.utils.clip_grad_norm_(clipped, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # FSDP's DTensor: the norm over every worker's shards
            grad_norm = grad_norm.full_tensor()  # (not imported here: torch.distributed.tensor costs the driver ~1 s)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if first_compile:
            compile_cache.save_artifacts(self.compile_artifacts)
        return loss_sum / len(batches), grad_norm
