"""What a worker returns: its variant's record (rank 0's becomes the variant in summary.json),
and the step timing it summarises."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


class StepTimes:
    """Step times measured between logging steps (the only host syncs), one entry per step."""

    def __init__(self):
        self.times: list[float] = []
        self._last, self._pending = time.perf_counter(), 0

    def stepped(self) -> None:
        self._pending += 1

    def logged(self) -> float:
        """The mean time of the steps since the last log; called after a host sync."""
        now = time.perf_counter()
        dt = (now - self._last) / self._pending
        self.times += [dt] * self._pending
        self._last, self._pending = now, 0
        return dt

    def steady_median(self) -> float | None:
        """Median step time, leaving out this process's first steps (compile, allocator warm-up)."""
        skip = min(len(self.times) - 1, max(1, len(self.times) // 10)) if self.times else 0
        steady = self.times[skip:]
        return statistics.median(steady) if steady else None


def worker_result(*, spec, requested: str, kernel: str, env: dict, workers: list, start_step: int,
                  restored_from: str | None, first_loss: float | None, record: dict, times: StepTimes,
                  device: torch.device, world: int, dtype: torch.dtype, compiled: bool, params: int,
                  flops_per_token: float, tokens_per_step: int, timeline: dict,
                  kernel_timings: dict | None = None, peak_tflops: float | None = None,
                  param_dtype: str = "fp32") -> dict:
    from trainer import compile_mode, timing

    median_step = times.steady_median()
    peak, peak_kind = peak_memory_bytes(device)
    return {
        "variant": spec.variant,
        "attention": requested,
        "backend": kernel,
        "env": env,
        "workers": workers,
        "strategy": spec.strategy,
        "steps": spec.train.max_steps,
        "start_step": start_step,
        "restored_from": restored_from,
        "first_loss": first_loss,
        "final_loss": record.get("loss"),
        "step_time_s": median_step,
        "tokens_per_s": tokens_per_step / median_step if median_step else None,
        **timing.per_gpu(tokens_per_step / median_step if median_step else None, world, flops_per_token, device,
                         peak_tflops),
        "kernel_timings": kernel_timings or {},
        "float8": spec.train.float8,
        "float8_recipe": spec.train.float8_recipe if spec.train.float8 else None,
        "loss_impl": spec.train.loss_impl,
        "compile_mode": spec.train.compile_mode if compiled else None,
        "compile_scope": compile_mode.scope(spec.train.compile_mode, spec.strategy, compiled=compiled),
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "num_workers": world,
        "use_gpu": device.type == "cuda",
        "dtype": str(dtype).removeprefix("torch."),
        "param_dtype": param_dtype,
        "compiled": compiled,
        "params": params,
        "flops_per_token": flops_per_token,
        "tokens_per_step": tokens_per_step,
        # Wall-clock times for the driver's startup breakdown (worker up -> ready -> first step).
        "timeline": timeline,
    }
