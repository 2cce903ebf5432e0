"""What a worker returns: its variant's record (rank 0's becomes the variant in summary.json),
and the step timing it summarises."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

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

    def resume(self) -> None:
        """Time from now on counts for the next steps: what ran since the last log (an
        evaluation) is not a step."""
        self._last = time.perf_counter()

    def steady_median(self) -> float | None:
        """Median step time, leaving out this process's first steps (compile, allocator warm-up)."""
        skip = min(len(self.times) - 1, max(1, len(self.times) // 10)) if self.times else 0
        steady = self.times[skip:]
        return statistics.median(steady) if steady else None


@dataclass
class Progress:
    """Where a worker's training stands: the step it started at (after a restore), the first
    logged loss, the last logged step's metrics, the step times and, per checkpoint, its step and
    block_s, the seconds training stood still for it."""

    start_step: int = 0
    restored_from: str | None = None
    first_loss: float | None = None
    record: dict = field(default_factory=dict)
    times: StepTimes = field(default_factory=StepTimes)
    checkpoint_block_s: list[dict] = field(default_factory=list)


def worker_result(spec, s, progress: Progress, *, requested: str, kernel: str, kernel_timings: dict | None,
                  env: dict, workers: list, params: int, timeline: dict) -> dict:
    """The variant's record from this worker: ``spec`` (its WorkerSpec) trained under ``s`` (its
    ``trainer.builder.Settings``) with the attention ``requested`` run by ``kernel``."""
    from trainer import timing

    median_step = progress.times.steady_median()
    tokens_per_s = s.tokens_per_step / median_step if median_step else None
    peak, peak_kind = peak_memory_bytes(s.device)
    return {
        "variant": spec.variant,
        "attention": requested,
        "backend": kernel,
        "env": env,
        "workers": workers,
        "strategy": spec.strategy,
        "steps": spec.train.max_steps,
        "start_step": progress.start_step,
        "restored_from": progress.restored_from,
        "first_loss": progress.first_loss,
        "final_loss": progress.record.get("loss"),
        "step_time_s": median_step,
        "tokens_per_s": tokens_per_s,
        **timing.per_gpu(tokens_per_s, s.world_size, s.flops_per_token, s.device,
                         timing.peak_tflops(s.device)),
        "kernel_timings": kernel_timings or {},
        "float8": spec.train.float8,
        "float8_recipe": spec.train.float8_recipe if spec.train.float8 else None,
        "loss_impl": s.train.loss_impl,
        "micro_batch_size": s.train.micro_batch_size,
        "auto": {**spec.auto, **s.auto},
        "compile_mode": spec.train.compile_mode if s.compiled else None,
        "compile_scope": s.compile_scope,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "num_workers": s.world_size,
        "use_gpu": s.device.type == "cuda",
        "dtype": str(s.dtype).removeprefix("torch."),
        "param_dtype": s.param_dtype,
        "compiled": s.compiled,
        "params": params,
        "flops_per_token": s.flops_per_token,
        "tokens_per_step": s.tokens_per_step,
        # Wall-clock times for the driver's startup breakdown (worker up -> ready -> first step).
        "timeline": timeline,
        "checkpoint_block_s": progress.checkpoint_block_s,
    }
