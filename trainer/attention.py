"""Attention backends, resolved in one place.

``standard`` is the explicit matmul -> causal mask -> softmax -> matmul our users know.
``flash`` is the fastest fused kernel that works on this worker, chosen by trying each
candidate on a tiny causal forward+backward at the model's head dim, GQA ratio and dtype,
and comparing it to ``standard``. The chosen SDPA kernel is pinned with ``sdpa_kernel`` so
PyTorch cannot silently fall back to another one: the name recorded is the kernel that ran.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.config import ATTENTIONS as IMPLS  # the names a worker can be asked for
from trainer.model import AttnFn  # the attention callable the model takes

log = logging.getLogger(__name__)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, nkv, T, hs) -> (B, nkv * n_rep, T, hs): each kv head serves n_rep query heads.
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


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


def _sdpa(kernel: SDPBackend) -> AttnFn:
    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_rep = q.size(1) // k.size(1)
        # Not every fused kernel takes GQA natively; expanding kv keeps them all on one path.
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attn


def _flash_attn_package(module: str) -> AttnFn:
    """The flash_attn package family takes (B, T, nh, hs) and does GQA natively."""
    import importlib

    if module == "flash_attn_4":
        func = importlib.import_module("flash_attn.cute").flash_attn_func
    elif module == "flash_attn_3":
        func = importlib.import_module("flash_attn_interface").flash_attn_func
    else:
        func = importlib.import_module("flash_attn").flash_attn_func

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        if isinstance(out, tuple):  # FA3/FA4 return (out, lse)
            out = out[0]
        return out.transpose(1, 2)

    return attn


# Candidate kernels for "flash", by device type, fastest first. On Hopper cuDNN's fused
# attention beats FlashAttention-2 (see docs/BENCHMARKS.md), so it goes before FA2 there.
def flash_candidates(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["sdpa_flash_cpu"]
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return ["flash_attn_3", "flash_attn_4", "sdpa_cudnn", "flash_attn_2", "sdpa_flash", "sdpa_efficient"]
    return ["flash_attn_2", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]


_SDPA_KERNELS = {
    "sdpa_flash_cpu": SDPBackend.FLASH_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
FLASH_ATTN_PACKAGE_KERNELS = ("flash_attn_2", "flash_attn_3", "flash_attn_4")
KERNELS = ("standard", *_SDPA_KERNELS, *FLASH_ATTN_PACKAGE_KERNELS)


def kernel_fn(name: str) -> AttnFn:
    """The attention function for a kernel name; importing a flash_attn package may raise."""
    if name == "standard":
        return standard_attention
    if name in _SDPA_KERNELS:
        return _sdpa(_SDPA_KERNELS[name])
    if name in FLASH_ATTN_PACKAGE_KERNELS:
        return _flash_attn_package(name)
    raise ValueError(f"unknown attention kernel {name!r}; expected one of {', '.join(KERNELS)}")


def check_kernel(
    fn: AttnFn, *, device: torch.device, dtype: torch.dtype, head_dim: int, n_heads: int, n_kv_heads: int
) -> None:
    """Run a tiny causal fwd+bwd and compare with ``standard`` in fp32; raise on any mismatch."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape_q, shape_kv = (2, n_heads, 67, head_dim), (2, n_kv_heads, 67, head_dim)
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


@dataclass
class Resolved:
    requested: str
    kernel: str
    fn: AttnFn
    rejected: dict[str, str] = field(default_factory=dict)  # kernel -> why it was passed over


def resolve(
    requested: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    n_heads: int,
    n_kv_heads: int,
    flash_attn_allowed: bool = True,
) -> Resolved:
    """Pick the kernel for ``requested`` ('flash' or 'standard') on this worker.

    'flash' falls back to 'standard' when no fused kernel passes its check here; the
    reasons land in ``rejected`` so the caller can log and record them.
    """
    if requested not in IMPLS:
        raise ValueError(f"unknown attention {requested!r}; expected one of {', '.join(IMPLS)}")
    if requested == "standard":
        return Resolved(requested, "standard", standard_attention)
    rejected: dict[str, str] = {}
    for name in flash_candidates(device):
        if name in FLASH_ATTN_PACKAGE_KERNELS and not flash_attn_allowed:
            rejected[name] = "flash-attn imports are blocked (DISABLE_FLASH_ATTN=1)"
            continue
        try:
            fn = kernel_fn(name)
            check_kernel(fn, device=device, dtype=dtype, head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
        except Exception as e:  # any failure (import, launch, numerics) disqualifies the kernel
            rejected[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            continue
        return Resolved(requested, name, fn, rejected)
    log.warning("no flash kernel works on this worker; using standard attention: %s", rejected)
    return Resolved(requested, "standard", standard_attention, rejected)
