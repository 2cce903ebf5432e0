"""Timing that waits for the device (CUDA events on GPU, perf_counter on CPU; median of runs),
and model FLOPs utilisation against the device's dense bf16 peak. One owner for the bench, the
kernel selection and the training loop's live MFU."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

# Dense bf16 peak (TFLOP/s) by device name, the MFU denominator.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0,
                    "B200": 2250.0, "GH200": 989.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def peak_tflops_of(device_name: str) -> float | None:
    """The peak of a GPU by the name CUDA gives it (a worker reports its own); None if unknown or a CPU."""
    return next((v for k, v in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in device_name), None)


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s of one device over its peak (None: peak unknown)."""
    return flops_per_token * tokens_per_s_per_device / (peak * 1e12) if peak else None


def per_gpu(tokens_per_s: float | None, world_size: int, flops_per_token: float, device: torch.device,
            peak: float | None) -> dict:
    """``tokens_per_s_per_gpu`` and ``mfu`` of a data-parallel run (None on CPU, where they mean nothing)."""
    if device.type != "cuda" or not tokens_per_s:
        return {"tokens_per_s_per_gpu": None, "mfu": None}
    tps = tokens_per_s / world_size
    return {"tokens_per_s_per_gpu": tps, "mfu": mfu(flops_per_token, tps, peak)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int) -> list[float]:
    """Seconds per call for ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def group_size(seconds_per_call: float, group_s: float, max_group: int) -> int:
    """Calls per timed group of calls run back to back: about ``group_s`` of work, at least one,
    at most ``max_group`` (``time_steps``; ``trainer.attention.timing.block_timer``)."""
    return max(1, min(max_group, math.ceil(group_s / max(seconds_per_call, 1e-9))))


# About this much work between the host's waits when timing training steps (``time_steps``).
STEPS_GROUP_S = 0.05


def time_steps(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int,
               group_s: float = STEPS_GROUP_S) -> list[float]:
    """Seconds per call over ``iters`` calls after ``warmup``, the calls queued back to back as the
    training loop queues its steps (its only wait on the GPU is at a logging step): one figure
    per group of calls, about ``group_s`` of work each. The first call sizes the groups; calls
    left over after the last whole group run untimed, so ``fn`` runs exactly warmup + iters
    times. ``time_runs`` waits after every call, which adds the host's time to launch the next
    one to every short step (docs/performance.md). A call longer than ``group_s`` is a group of
    one, timed as ``time_runs`` times it."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    sizing = time_runs(fn, device, warmup=0, iters=1)[0]
    left = iters - 1
    group = group_size(sizing, group_s, max_group=max(1, left))
    groups, rest = divmod(left, group)

    def calls():
        for _ in range(group):
            fn()

    times = [t / group for t in time_runs(calls, device, warmup=0, iters=groups)] if groups else [sizing]
    for _ in range(rest):
        fn()
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
