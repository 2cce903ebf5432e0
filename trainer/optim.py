"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay."""

from __future__ import annotations

import inspect
import math

import torch

from trainer.config import TrainConfig
from trainer.master_weights import MasterWeights


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup to ``lr``, cosine down to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matmuls and embeddings; not norms
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is one launch for all parameters; it exists on CUDA only.
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """``build_optimizer``'s AdamW, on fp32 master copies where the model's weights are bf16
    (``train.param_dtype``: trainer/master_weights.py). FSDP's shards are fp32 already."""
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        return MasterWeights(model, lambda masters: build_optimizer(masters, cfg, device))
    return build_optimizer(model, cfg, device)
