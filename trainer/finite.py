"""A loss, gradient norm or weight that is no longer finite stops the variant (issue 32).

Once a step's loss or gradient norm is NaN or infinite, every later step is too, and each
checkpoint after it would hold ruined weights and rotate a good one out. The loop does not
wait on the device every step, so ``Watch`` keeps, on the device, the first step that went
wrong and its values; ``check`` reads that on the steps the loop already syncs (every logged
and checkpointed step), and before a checkpoint also looks at the weights themselves. It
raises a ``DeterministicFailure``: the same config replays the same batches from the last
checkpoint and diverges again, so Ray's failure policy does not retry it.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from trainer.failures import DeterministicFailure

KIND = "non_finite_loss"
_NONE = torch.iinfo(torch.int64).max  # no step went wrong yet (the minimum over workers wins)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This worker's shard of an FSDP parameter (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def non_finite(tensors: dict[str, torch.Tensor]) -> Optional[str]:
    """Which of ``tensors`` hold a NaN or an infinity, in words; None when all are finite."""
    names = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not names:
        return None
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"NaN or infinite values in {', '.join(names[:3])}{more}"


class Watch:
    def __init__(self, device: torch.device):
        self.first = torch.tensor(_NONE, device=device)  # the first step whose loss or grad norm was not finite
        self.values = torch.zeros(2, device=device)  # its loss and grad norm

    def stepped(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record step ``step``'s loss and grad norm (device tensors) without waiting for them."""
        values = torch.stack([loss.float(), grad_norm.float()])
        new = (self.first == _NONE) & ~torch.isfinite(values).all()
        self.first = torch.where(new, step, self.first)
        self.values = torch.where(new, values, self.values)

    def check(self, step: int, world: int, weights: Optional[Iterable[torch.Tensor]] = None) -> None:
        """Raise DeterministicFailure if a step up to ``step`` went wrong on any worker, or, when
        ``weights`` are given (before a checkpoint), if one of them is not finite. Every worker
        calls this at the same steps: it is a collective when ``world`` > 1."""
        bad_weights = torch.tensor(False, device=self.first.device)
        for p in weights or ():
            bad_weights |= ~torch.isfinite(_local(p.detach())).all()
        first = torch.stack([self.first, torch.where(bad_weights, step, _NONE)])
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first_step, weights_step = first.tolist()  # the one wait, on a step that waits anyway
        if first_step != _NONE:
            loss, grad_norm = self.values.tolist()
            mine = int(self.first) == first_step
            what = f"loss {loss:g}, grad norm {grad_norm:g}" if mine else "on another worker"
            raise DeterministicFailure(KIND, f"the loss or gradient norm was not finite at step {first_step} "
                                             f"({what}); no checkpoint was written after it: lower train.lr, "
                                             "or check the data and model.init_from")
        if weights_step != _NONE:
            raise DeterministicFailure(KIND, f"the weights were not finite after step {weights_step}, with a "
                                             "finite loss and gradient norm; no checkpoint was written from them")
