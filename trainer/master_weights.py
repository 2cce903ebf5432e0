"""``train.param_dtype``: the dtype the weights have in forward and backward, and the fp32 master
copies that bf16 weights need (the bf16 recipe of Megatron-LM and DeepSpeed).

- **fp32** (the default under ddp): the parameters are fp32 and bf16 autocast casts each weight
  for every matmul. The gradients come out in fp32, so DDP all-reduces 4 bytes per parameter.
- **bf16**: the parameters themselves are bf16. The gradients come out in bf16, and plain DDP
  all-reduces half the bytes, with no compression hook and no per-module hook in the compiled
  blocks. AdamW steps fp32 master copies (``MasterWeights``) and copies them back into the bf16
  parameters, so no update is lost to bf16's 8 bits of mantissa:
  - clipping measures and scales the fp32 gradients;
  - checkpoints keep the masters as the model's weights (``stateful``), so a checkpoint reads
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

    The masters live in ``holder``, a module with the model's parameter names (tied ones share
    one master), so a checkpoint of ``holder`` and ``inner`` (``stateful``) is keyed as one of the
    model over fp32 weights and a plain AdamW: it loads under either dtype and either strategy."""

    def __init__(self, model: nn.Module, build: Callable[[nn.Module], torch.optim.Optimizer]):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.holder = nn.Module()
        master_of: dict[int, nn.Parameter] = {}
        for name, p in model.named_parameters(remove_duplicate=False):  # in the model's order: the same groups
            if p.requires_grad:
                *path, leaf = name.split(".")
                _submodule(self.holder, path).register_parameter(
                    leaf, master_of.setdefault(id(p), nn.Parameter(p.detach().float().clone())))
        self.masters = [master_of[id(p)] for p in self.params]
        self.inner = build(self.holder)
        self.holder.register_load_state_dict_post_hook(lambda *_: self._copy_to_params())  # a checkpoint's masters

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

    def step(self) -> None:
        self.inner.step()
        self._copy_to_params()

    @torch.no_grad()
    def _copy_to_params(self) -> None:  # the masters' bf16 rounding: after a step, and after a load
        torch._foreach_copy_(self.params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)


def _submodule(root: nn.Module, path: list[str]) -> nn.Module:
    """``root``'s submodule at ``path``, made (empty) where it is not there yet."""
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    return root


def stateful(model: nn.Module, optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The module and optimizer whose state a checkpoint keeps: the fp32 masters and their AdamW
    where there are masters, so a checkpoint reads as a fp32 one (a resume continues exactly, and
    ``export`` reads full precision); loaded, the bf16 weights take their masters' rounding."""
    return (optimizer.holder, optimizer.inner) if isinstance(optimizer, MasterWeights) else (model, optimizer)
