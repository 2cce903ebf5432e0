"""The output head and the cross-entropy loss, three ways (``train.loss_impl``).

- ``standard``: ``head(h)`` gives the (B, T, vocab) logits, then cross-entropy in fp32. The
  logits, their fp32 copy and the log-softmax are all held for backward: at seq 4096 x 4 and
  vocab 32000 that is about 5 GiB, the largest activation of the ~0.95B config.
- ``chunked``: plain PyTorch. The head matmul and the cross-entropy run over chunks of tokens,
  and each chunk's gradients (for the hidden states and the head weight) are computed right
  there in forward, as liger-kernel does; backward only scales them. Only one chunk's logits
  exist at a time, so the memory freed allows a larger micro-batch.
- ``liger``: liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` (Triton, CUDA only), the same
  idea with fused kernels.
- ``auto``: liger where it imports on this worker's CUDA device, else standard (``resolve``;
  measured: docs/performance.md).

Both fused ways return no logits (the training step never reads them). The matmuls run in the
autocast dtype, like the standard head under autocast, and the softmax in fp32.
"""

from __future__ import annotations

from typing import Optional, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import LossImpl

LOSS_IMPLS: tuple[str, ...] = get_args(LossImpl)
# Logits per chunk (tokens x vocab): 2**25 fp32 values are 128 MiB, a few times that in flight;
# the matmuls stay large (at vocab 32000, 1024 tokens x 2048 x 32000 per chunk).
CHUNK_LOGITS = 2**25
LIGER_INSTALL = "pip install liger-kernel (with torch and triton; CUDA GPUs only)"


def liger_problem(device: torch.device) -> Optional[str]:
    """Why ``train.loss_impl: liger`` cannot run here (None: it can)."""
    missing = _liger_missing(device)
    if missing and device.type != "cuda":
        return f"train.loss_impl: {missing}. Use train.loss_impl: chunked or standard"
    return f"train.loss_impl: {missing}" if missing else None


def _liger_missing(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"liger needs a CUDA GPU (liger-kernel is Triton); this worker runs on {device.type}"
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception as e:  # not installed (ImportError), or installed but broken against this torch/triton
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"liger needs a working liger-kernel ({LIGER_INSTALL}): {type(e).__name__}: {first}"
    return None


def resolve(impl: str, device: torch.device) -> tuple[str, Optional[str]]:
    """(the loss implementation to run, why: None unless ``impl`` is auto) on ``device``."""
    if impl != "auto":
        return impl, None
    missing = _liger_missing(device)
    return ("standard", f"auto: {missing}") if missing else ("liger", "auto: liger-kernel imports on this CUDA device")


def check(impl: str, device: torch.device) -> None:
    """Raise ValueError naming ``train.loss_impl`` when ``impl`` (resolved) cannot run on ``device``."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"train.loss_impl: unknown {impl!r}; expected one of {', '.join(LOSS_IMPLS)}")
    problem = liger_problem(device) if impl == "liger" else None
    if problem:
        raise ValueError(problem)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: the largest power of two whose logits fit CHUNK_LOGITS."""
    n = max(1, CHUNK_LOGITS // vocab_size)
    return 1 << (n.bit_length() - 1)


def linear_cross_entropy(impl: str, hidden: torch.Tensor, head: nn.Linear,
                         targets: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(logits or None, mean loss) of ``head`` applied to ``hidden`` (B, T, d) against ``targets`` (B, T)."""
    if impl == "standard":
        logits = head(hidden)  # (B, T, vocab)
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
    h, w = _compute_dtype(hidden.reshape(-1, hidden.size(-1)), head.weight)
    if impl == "chunked":
        return None, ChunkedLinearCrossEntropy.apply(h, w, targets.reshape(-1), chunk_tokens(w.size(0)))
    if impl == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        # accum_dtype fp32: the head's gradient is summed over chunks in fp32, as chunked does.
        return None, LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)(w, h, targets.reshape(-1))
    raise ValueError(f"train.loss_impl: unknown {impl!r}; expected one of {', '.join(LOSS_IMPLS)}")


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in the dtype the head's matmul runs in: autocast's, else their common one.
    The casts are ordinary autograd ops, so the fp32 master weight gets an fp32 gradient."""
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    else:
        dtype = torch.promote_types(h.dtype, w.dtype)
    return h.to(dtype), w.to(dtype)


def _chunk(h_c: torch.Tensor, w: torch.Tensor, t_c: torch.Tensor, n: int, need_grad: bool):
    """One chunk: (sum of its token losses, d loss / d h_c, d loss / d w in fp32) of the mean over n tokens."""
    logits = (h_c @ w.t()).float()  # (chunk, vocab)
    lse = torch.logsumexp(logits, dim=-1)
    loss_sum = (lse - logits.gather(1, t_c.unsqueeze(1)).squeeze(1)).sum()
    if not need_grad:
        return loss_sum, None, None
    # softmax - one_hot, in place over the chunk's logits: no second (chunk, vocab) buffer in eager
    g = logits.sub_(lse.unsqueeze(1)).exp_()
    g.scatter_add_(1, t_c.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
    g = g.div_(n).to(h_c.dtype)
    return loss_sum, g @ w, (g.t() @ h_c).float()


# Device types on which each chunk's math is compiled: Inductor fuses the fp32 copy, the
# log-sum-exp, the softmax gradient and the cast into a few kernels around the matmuls, where
# eager makes a pass over the (chunk, vocab) logits for each. Not on CPU, where a compile means
# a C++ build (minutes on a small machine) and the chunk math is not what limits speed.
COMPILE_ON = ("cuda",)
COMPILE_BACKEND = "inductor"
_compiled: dict[str, object] = {}


def _chunk_fn(device_type: str):
    if device_type not in COMPILE_ON or torch.compiler.is_compiling():  # inside a compiled graph: trace it there
        return _chunk
    if COMPILE_BACKEND not in _compiled:
        _compiled[COMPILE_BACKEND] = torch.compile(_chunk, backend=COMPILE_BACKEND, dynamic=False)
    return _compiled[COMPILE_BACKEND]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over N tokens of cross_entropy(h @ w.T, targets), with h (N, d), w (vocab, d).

    Forward computes the loss and both gradients chunk by chunk (d loss / d logits =
    (softmax - one_hot) / N, in fp32); backward multiplies them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = h.size(0)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        step = _chunk_fn(h.device.type)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, n, chunk):
                loss_sum, gh, gw = step(h[start:start + chunk], w, targets[start:start + chunk], n, need_grad)
                total += loss_sum
                if need_grad:
                    grad_h[start:start + chunk] = gh
                    grad_w += gw
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_out.to(grad_h.dtype)) if ctx.needs_input_grad[0] else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None
