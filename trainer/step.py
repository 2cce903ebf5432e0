"""One optimizer step, shared by the Ray worker loop and the bare-process benchmark, so the
two time the same code. Nothing in a step waits on the GPU: batches go up from pinned memory
without blocking, and the loss stays on the device until the caller asks for it.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from trainer import compile_cache
from trainer.config import TrainConfig


def training_dtype(tc: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast on GPU (or when asked); fp32 otherwise."""
    return torch.bfloat16 if (tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")) else torch.float32


def compile_enabled(tc: TrainConfig, device: torch.device) -> bool:
    return tc.compile is True or (tc.compile == "auto" and device.type == "cuda")


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    if device.type == "cuda":
        # A copy from pageable memory makes the host wait for the stream; pinned does not.
        return t.pin_memory().to(device, non_blocking=True)
    return t


class Stepper:
    """Forward and backward over ``grad_accum`` micro-batches, clip, AdamW step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 dtype: torch.dtype, grad_accum: int, grad_clip: float, compile: bool):
        self.model = model  # possibly DDP-wrapped: no_sync() skips the all-reduce on early micro-steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        if compile:
            compile_cache.enable()  # before the first compile: a later run of the same shapes reuses it
        self.forward = torch.compile(model, dynamic=False) if compile else model  # shapes are fixed per run
        self.compile_artifacts = None  # the mega-cache file, known at the first step (its shapes)
        self.optimizer, self.device, self.dtype = optimizer, device, dtype
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def __call__(self, batches: list[tuple[np.ndarray, np.ndarray]], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (mean loss, grad norm) as device tensors."""
        first_compile = self.forward is not self.model and self.compile_artifacts is None
        if first_compile:
            self.compile_artifacts = compile_cache.artifacts_path(f"{self.model!r} {batches[0][0].shape} {self.dtype}")
            compile_cache.load_artifacts(self.compile_artifacts)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batches):
            x, y = to_device(x, self.device), to_device(y, self.device)
            last = micro == len(batches) - 1
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.autocast:
                    _, loss = self.forward(x, y)
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if first_compile:
            compile_cache.save_artifacts(self.compile_artifacts)
        return loss_sum / len(batches), grad_norm
