"""A flash_attn-family kernel as a registered PyTorch custom op, so ``torch.compile`` traces
through it instead of breaking the graph at an opaque ``autograd.Function``.

PyTorch's guidance for third-party kernels (torch.library.custom_op): the forward and the
backward are each an op with a fake (meta) implementation for tracing, and
``register_autograd`` ties them together. The forward returns the log-sum-exp, which the
backward needs; the backward op recomputes nothing. Layout is the flash_attn family's
(B, T, nh, hs), with native GQA: k and v keep their nkv heads.

``register`` takes the kernel's forward and backward as plain functions, so a reference
implementation can stand in for the real kernel where there is no GPU (see the tests).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


NAMESPACE = "flash_orchestrator"
# (q, k, v, softmax_scale) -> (out, lse); lse: (B, nh, T) fp32.
FwdFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
# (dout, q, k, v, out, lse, softmax_scale) -> (dq, dk, dv)
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_registered: dict[str, AttnFn] = {}


def register(name: str, fwd: FwdFn, bwd: BwdFn) -> AttnFn:
    """Register ``{NAMESPACE}::{name}_fwd`` / ``_bwd`` (once per process) and return the causal
    attention function (q, k, v in (B, nh, T, hs), like the model's) that calls them."""
    if name in _registered:
        return _registered[name]

    @torch.library.custom_op(f"{NAMESPACE}::{name}_fwd", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return fwd(q, k, v, softmax_scale)

    @forward.register_fake
    def _(q, k, v, softmax_scale):
        B, T, H, _ = q.shape
        return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)

    @torch.library.custom_op(f"{NAMESPACE}::{name}_bwd", mutates_args=())
    def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return bwd(dout, q, k, v, out, lse, softmax_scale)

    @backward.register_fake
    def _(dout, q, k, v, out, lse, softmax_scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, softmax_scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale = softmax_scale

    def grad(ctx, dout, _dlse):  # the lse is an internal output: no gradient flows into it
        q, k, v, out, lse = ctx.saved_tensors
        return (*backward(dout.contiguous(), q, k, v, out, lse, ctx.softmax_scale), None)

    forward.register_autograd(grad, setup_context=setup_context)

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, nh, T, hs) -> the kernel's (B, T, nh, hs): strided views, no copies (the kernels
        # need only the head dim contiguous).
        out, _ = forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1.0 / math.sqrt(q.size(-1)))
        return out.transpose(1, 2)

    _registered[name] = attn
    return attn


# ---------------------------------------------------------------- FA4 (flash_attn.cute)

def fa4() -> AttnFn:
    """FA4's causal attention as a custom op; importing flash_attn.cute may raise (the registry's
    loader switches FA4's disk cache on first)."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    def fwd(q, k, v, softmax_scale):
        # return_lse: the op's inputs never require grad, and FA4 only makes the lse for those
        # that do. Releases differ in what follows (out, lse): 4.0.0b36 adds three more.
        res = _flash_attn_fwd(q, k, v, softmax_scale=softmax_scale, causal=True, return_lse=True)
        return res[0], res[1]

    def bwd(dout, q, k, v, out, lse, softmax_scale):
        return tuple(_flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, True)[:3])

    return register("fa4", fwd, bwd)
