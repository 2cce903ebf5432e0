"""The attention functions and their correctness check.

``standard`` is the explicit matmul -> causal mask -> softmax -> matmul our users know, and the
reference every fused kernel is checked against (``check_kernel``: a tiny causal forward and
backward at the model's head dim, GQA ratio and dtype). SDPA kernels are pinned with
``sdpa_kernel`` so PyTorch cannot silently fall back to another one: the name recorded is the
kernel that ran. GQA goes to every kernel natively.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.model import AttnFn  # the attention callable the model takes

# SDPA takes GQA natively (enable_gqa) from torch 2.5 on.
SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, nkv, T, hs) -> (B, nkv * n_rep, T, hs): each kv head serves n_rep query heads.
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def unresolved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention of a model built before its kernel was chosen (``trainer.loop`` builds the
    model while the kernel is checked); ``parallelize.set_attention`` replaces it before the
    first step."""
    raise RuntimeError("attention ran before its kernel was chosen (parallelize.set_attention)")


def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (B, nh, T, hs), k/v: (B, nkv, T, hs) -> (B, nh, T, hs), causal."""
    n_rep = q.size(1) // k.size(1)
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~mask, float("-inf"))
    # Softmax in at least fp32: bf16 logits lose the small probabilities.
    att = F.softmax(att.to(torch.promote_types(att.dtype, torch.float32)), dim=-1).type_as(q)
    return att @ v


def sdpa(kernel: str, native_gqa: bool = True) -> AttnFn:
    """PyTorch's SDPA pinned to one kernel (``SDPBackend`` name), so it cannot fall back to another."""
    backend = getattr(SDPBackend, kernel)
    native = native_gqa and SDPA_HAS_GQA

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_rep = q.size(1) // k.size(1)
        gqa = {}
        if n_rep > 1 and native:
            gqa = {"enable_gqa": True}  # K and V stay at nkv heads: no copies
        elif n_rep > 1:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    return attn


def flash_attn_func(module: str) -> AttnFn:
    """``module``'s flash_attn_func (FA2, FA3): takes (B, T, nh, hs) and does GQA natively."""
    func = getattr(importlib.import_module(module), "flash_attn_func", None)
    if func is None:  # a namespace without FA2: flash-attn-4 alone installs flash_attn.cute only
        raise ImportError(f"module {module!r} has no attribute 'flash_attn_func' "
                          "(flash-attn-4 alone installs flash_attn.cute only: FA2 is not installed)")

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        if isinstance(out, tuple):  # FA3 returns (out, lse)
            out = out[0]
        return out.transpose(1, 2)

    return attn


# The check's sequence length: not a multiple of a kernel's tile (the masked edge is checked), and
# over two tiles of 128 queries: FA4 compiles another kernel for a single tile of queries, so at
# this length its check compiles the kernel a training step uses (docs/preflight.md).
CHECK_SEQ_LEN = 323


def check_kernel(
    fn: AttnFn, *, device: torch.device, dtype: torch.dtype, head_dim: int, n_heads: int, n_kv_heads: int
) -> None:
    """Run a small causal fwd+bwd and compare with ``standard`` in fp32; raise on any mismatch."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape_q, shape_kv = (2, n_heads, CHECK_SEQ_LEN, head_dim), (2, n_kv_heads, CHECK_SEQ_LEN, head_dim)
    q, k, v = (torch.randn(s, generator=gen).to(device) for s in (shape_q, shape_kv, shape_kv))
    do = torch.randn(shape_q, generator=gen).to(device)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = standard_attention(*ref_inputs)
    ref.backward(do)
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*inputs)
    out.backward(do.to(dtype))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    pairs = [("output", out, ref)] + [
        (f"d{n}", a.grad, b.grad) for n, a, b in zip("qkv", inputs, ref_inputs)
    ]
    for what, got, want in pairs:
        err = (got.float() - want).abs().max().item()
        if not math.isfinite(err) or err > tol * max(1.0, want.abs().max().item()):
            raise RuntimeError(f"{what} differs from standard attention by {err:.3g} (tolerance {tol})")
