"""``train.param_dtype``: the dtype the weights have in forward and backward, and the fp32 master
copies that bf16 weights need (the bf16 recipe of Megatron-LM and DeepSpeed).

- **fp32** (the default under ddp): the parameters are fp32 and bf16 autocast casts each weight
  for every matmul. The gradients come out in fp32, so DDP all-reduces 4 bytes per parameter.
- **bf16**: the parameters themselves are bf16. The gradients come out in bf16, and plain DDP
  all-reduces half the bytes, with no compression hook and no per-module hook in the compiled
  blocks. AdamW steps fp32 master copies (``MasterWeights``) and copies them back into the bf16
  parameters, so no update is lost to bf16's 8 bits of mantissa:
  - clipping measures and scales the fp32 gradients;
  - checkpoints keep the masters as the model's weights (``model_state``), so a checkpoint reads
    as a fp32 one: a resume continues exactly, and ``export`` reads full precision;
  - gradient accumulation sums the micro-steps' gradients in bf16, where DDP reduces them.
- Under fsdp, FSDP2's ``MixedPrecisionPolicy`` does this on its own: its fp32 shards are the
  masters and ``param_dtype`` is what it gathers. So ``auto`` is bf16 there when the run computes
  in bf16, and fp32 makes FSDP gather fp32 weights for autocast to cast.

The residual stream is then bf16, as it is under fsdp (measurements: docs/performance.md).

Which dtype a run uses is decided in ``trainer.parallel`` (``weights_dtype``) and ``trainer.config``
(``param_dtype_refusal``), without torch, where the driver plans; this module is the worker's side.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def torch_dtype(param_dtype: str) -> torch.dtype:
    """The torch dtype of a resolved ``train.param_dtype`` (``trainer.parallel.weights_dtype``)."""
    return torch.bfloat16 if param_dtype == "bf16" else torch.float32


@torch.no_grad()
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters in place (tied ones stay tied); the buffers, the rotary tables, stay
    fp32, as under autocast."""
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


class MasterWeights:
    """An optimizer (``trainer.optim.optimizer_for``'s AdamW, same groups) on fp32 master copies of a
    model's bf16 parameters. A step: ``take_grads`` moves the bf16 gradients into the masters as
    fp32 (what clipping sees), ``step`` updates the masters and copies them into the parameters.

    ``state_dict`` is the inner AdamW's, indexed as a plain AdamW over the model would be, so a
    checkpoint's optimizer state loads either way; the masters travel as the checkpoint's model
    weights (``model_state`` / ``load_model_state``)."""

    def __init__(self, model: nn.Module, build: Callable[[nn.Module], torch.optim.Optimizer]):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        holder = nn.Module()  # the masters in the model's parameter order, for build_optimizer's groups
        holder.masters = nn.ParameterList([nn.Parameter(p.detach().float().clone()) for p in self.params])
        self.masters = list(holder.masters)
        self.inner = build(holder)

    @property
    def param_groups(self) -> list[dict]:
        """The inner AdamW's groups (where the step sets the lr), read through: loading a state
        dict gives the inner optimizer new group dicts."""
        return self.inner.param_groups

    def take_grads(self) -> list[torch.Tensor]:
        """The gradients, as fp32 on the masters (the bf16 ones are let go); returns the masters."""
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        return self.masters

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        torch._foreach_copy_(self.params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def model_state(self) -> dict:
        """The model's state dict with each parameter's fp32 master in its place (tied names
        share one), the buffers as they are."""
        master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        return {name: master_of[id(t)].detach() if id(t) in master_of else t.detach()
                for name, t in self.model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_model_state(self, state: dict) -> None:
        """Load a checkpoint's model weights: the masters take them as they are (fp32), the
        parameters their bf16 rounding, as after a step."""
        self.model.load_state_dict(state)
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, m in zip(self.params, self.masters):
            m.copy_(state[names[id(p)]])


def model_state(model: nn.Module, optimizer) -> dict:
    """What a checkpoint keeps as the model's weights: the fp32 masters where there are some."""
    return optimizer.model_state() if isinstance(optimizer, MasterWeights) else model.state_dict()


def load_model_state(model: nn.Module, optimizer, state: dict) -> None:
    if isinstance(optimizer, MasterWeights):
        optimizer.load_model_state(state)
    else:
        model.load_state_dict(state)
