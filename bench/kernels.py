"""Attention kernels, forward+backward: TFLOP/s and peak memory by sequence length.

Every kernel is first checked against standard attention in fp32 (trainer.attention's check);
only kernels that pass are timed, on random (never all-zero) inputs.
"""

from __future__ import annotations

import logging

import torch

from trainer import timing
from trainer import attention

log = logging.getLogger(__name__)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool = True) -> float:
    """FLOPs of one causal fwd+bwd: 4*B*H*T^2*D forward, halved by the mask, backward 2.5x."""
    fwd = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return 3.5 * fwd


def usable_kernels(device: torch.device) -> list[str]:
    return ["standard", *attention.flash_candidates(device)]


def bench_kernel(name: str, *, seq: int, tokens: int, heads: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, warmup: int = 3, iters: int = 10) -> dict:
    batch = max(1, tokens // seq)
    row = {"kernel": name, "seq_len": seq, "batch": batch, "heads": heads, "kv_heads": kv_heads,
           "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch.")}
    try:
        fn = attention.checked_fn(name, device=device, dtype=dtype, head_dim=head_dim, n_heads=heads, n_kv_heads=kv_heads)
    except Exception as e:
        return {**row, "status": "unavailable", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        timing.reset_peak_memory(device)
        q = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
        k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
        v = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=gen, requires_grad=True)
        do = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen)

        def step():
            out = fn(q, k, v)
            out.backward(do)
            q.grad = k.grad = v.grad = None

        times = timing.time_runs(step, device, warmup=warmup, iters=iters)
    except Exception as e:
        if timing.is_oom(e):
            return {**row, "status": "oom", "error": "out of memory"}
        return {**row, "status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        q = k = v = do = None
    t = timing.median(times)
    return {**row, "status": "ok", "ms": t * 1e3, "tflops": attention_flops(batch, heads, seq, head_dim) / t / 1e12,
            "peak_mem_bytes": timing.peak_memory(device)}


def run(seq_lens: list[int], *, tokens: int, heads: int, kv_heads: int, head_dim: int, device: torch.device,
        dtype: torch.dtype, kernels: list[str] | None = None, iters: int = 10, on_row=None) -> list[dict]:
    rows = []
    for seq in seq_lens:
        for name in kernels or usable_kernels(device):
            row = bench_kernel(name, seq=seq, tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                               device=device, dtype=dtype, iters=iters)
            log.info("attention %-15s seq %6d: %s", name, seq,
                     f"{row['tflops']:.1f} TFLOP/s, {row['ms']:.2f} ms" if row["status"] == "ok" else row["status"])
            rows.append(row)
            if on_row:
                on_row(rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
