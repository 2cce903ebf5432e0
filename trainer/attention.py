"""Attention backends, resolved in one place.

``standard`` is the explicit matmul -> causal mask -> softmax -> matmul our users know.
``flash`` is the fastest fused kernel that works on this worker: each candidate is tried on a
tiny causal forward+backward at the model's head dim, GQA ratio and dtype and compared to
``standard``; among those that pass, ``resolve``'s ``pick`` (trainer/kernel_select.py) times
them at the run's shape, else the first in ``flash_candidates`` order wins. The chosen SDPA
kernel is pinned with ``sdpa_kernel`` so PyTorch cannot silently fall back to another one:
the name recorded is the kernel that ran. GQA goes to every kernel natively.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.config import ATTENTIONS as IMPLS  # the names a worker can be asked for
from trainer.model import AttnFn  # the attention callable the model takes

# SDPA takes GQA natively (enable_gqa) from torch 2.5 on.
_SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)
log = logging.getLogger(__name__)


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


def _sdpa(kernel: SDPBackend, native_gqa: bool = True) -> AttnFn:
    native = native_gqa and _SDPA_HAS_GQA

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_rep = q.size(1) // k.size(1)
        gqa = {}
        if n_rep > 1 and native:
            gqa = {"enable_gqa": True}  # K and V stay at nkv heads: no copies
        elif n_rep > 1:
            k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    return attn


def _flash_attn_package(module: str) -> AttnFn:
    """The flash_attn package family takes (B, T, nh, hs) and does GQA natively."""
    import importlib

    if module == "flash_attn_4":
        # A registered custom op: torch.compile traces through it without a graph break.
        from trainer import flash_op

        return flash_op.fa4()
    if module == "flash_attn_3":
        func = importlib.import_module("flash_attn_interface").flash_attn_func
    else:
        func = getattr(importlib.import_module("flash_attn"), "flash_attn_func", None)
        if func is None:  # a namespace without FA2: flash-attn-4 alone installs flash_attn.cute only
            raise ImportError("module 'flash_attn' has no attribute 'flash_attn_func' "
                              "(flash-attn-4 alone installs flash_attn.cute only: FA2 is not installed)")

    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        if isinstance(out, tuple):  # FA3 returns (out, lse)
            out = out[0]
        return out.transpose(1, 2)

    return attn


# Candidate kernels for "flash", by device type, in the order tried (the first that passes wins
# where nothing is timed: one candidate, or no pick). On Hopper cuDNN's fused
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


def checked_fn(name: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, n_heads: int,
               n_kv_heads: int) -> AttnFn:
    """``kernel_fn(name)`` once it passed ``check_kernel`` here; raises when it does not.

    An SDPA kernel that refuses native GQA on this device (not every fused kernel takes it)
    is checked again with K and V repeated, so the kernel is not lost for a GQA model.
    """
    shape = dict(device=device, dtype=dtype, head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
    fn = kernel_fn(name)
    try:
        check_kernel(fn, **shape)
        return fn
    except Exception:
        if name not in _SDPA_KERNELS or n_heads == n_kv_heads or not _SDPA_HAS_GQA:
            raise
    fn = _sdpa(_SDPA_KERNELS[name], native_gqa=False)
    check_kernel(fn, **shape)
    return fn


def _why(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


# Chooses among the kernels that passed their check: (kernel, {kernel: ms per iteration}).
Picker = Callable[[dict[str, AttnFn]], tuple[str, dict[str, float]]]


@dataclass
class Resolved:
    requested: str
    kernel: str
    fn: AttnFn
    rejected: dict[str, str] = field(default_factory=dict)  # kernel -> why it was passed over
    timings: dict[str, float] = field(default_factory=dict)  # kernel -> ms per iteration, when timed


def resolve(
    requested: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    n_heads: int,
    n_kv_heads: int,
    flash_attn_allowed: bool = True,
    pick: Picker | None = None,
) -> Resolved:
    """Pick the kernel for ``requested`` ('flash' or 'standard') on this worker.

    Without ``pick`` the first candidate (in ``flash_candidates`` order) that passes its check
    wins; with it, every candidate is checked and ``pick`` chooses among those that passed
    (``trainer.kernel_select``: by timing). 'flash' falls back to 'standard' when no fused
    kernel passes its check here; the reasons land in ``rejected`` so the caller can log and
    record them.
    """
    if requested not in IMPLS:
        raise ValueError(f"unknown attention {requested!r}; expected one of {', '.join(IMPLS)}")
    if requested == "standard":
        return Resolved(requested, "standard", standard_attention)
    rejected: dict[str, str] = {}
    passed: dict[str, AttnFn] = {}
    for name in flash_candidates(device):
        if name in FLASH_ATTN_PACKAGE_KERNELS and not flash_attn_allowed:
            rejected[name] = "flash-attn imports are blocked (DISABLE_FLASH_ATTN=1)"
            continue
        try:
            passed[name] = checked_fn(name, device=device, dtype=dtype, head_dim=head_dim, n_heads=n_heads,
                                      n_kv_heads=n_kv_heads)
        except Exception as e:  # any failure (import, launch, numerics) disqualifies the kernel
            rejected[name] = _why(e)
            continue
        if pick is None:
            return Resolved(requested, name, passed[name], rejected)
    if not passed:
        log.warning("no flash kernel works on this worker; using standard attention: %s", rejected)
        return Resolved(requested, "standard", standard_attention, rejected)
    kernel, timings = pick(passed)  # "standard" when it timed fastest at this shape
    fn = standard_attention if kernel == "standard" else passed[kernel]
    return Resolved(requested, kernel, fn, rejected, timings)
