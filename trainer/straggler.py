"""Stragglers while training: a rank whose compute time per step, over the last ``WINDOW`` steps,
is more than ``RATIO`` times the median rank's. Every step waits for the slowest rank at the
gradient collective, so one slow GPU or host holds the whole run back. Preflight's GEMM canary
finds a slow GPU before training (orchestrator/preflight/health.py); this finds one that is slow,
or becomes slow, while it trains.

What is timed is each rank's own work up to the step's gradient collective: the forward passes and
the backward of micro-steps that do not sync, not the last backward, because DDP's all-reduce
overlaps it and waits there for the slowest rank, which would make every rank look as slow as the
straggler. (Under FSDP the forward's all-gathers also wait on the other ranks, which can hide one.)
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Sequence

import torch
import torch.distributed as dist

WINDOW = 20  # steps each rank's median is taken over
RATIO = 1.1  # a rank slower than this times the median rank's is a straggler


def stragglers(times: Sequence[Sequence[float]], ratio: float = RATIO) -> dict[int, float]:
    """The ranks whose median time per step is more than ``ratio`` times the median over all
    ranks, each with its median over that median; ``times`` holds one window per rank."""
    medians = [statistics.median(t) for t in times]
    overall = statistics.median(medians) if medians else 0.0
    if overall <= 0:
        return {}
    return {rank: m / overall for rank, m in enumerate(medians) if m > ratio * overall}


class ComputeTimer:
    """This rank's compute time per step, the last ``window`` steps. ``start`` and ``stop`` mark
    each step; on a GPU they are events on the stream (the host runs ahead and waits only on
    logging steps), read by ``window_s`` after such a wait."""

    def __init__(self, device: torch.device, window: int = WINDOW):
        self.cuda = device.type == "cuda"
        self.times: deque[float] = deque(maxlen=window)
        self._marks: list = []  # (start, stop) per step since the last window_s
        # Left out: the process's first step compiles and warms the allocator, and DDP's second
        # forward rebuilds its gradient buckets, a collective that waits for the slowest rank.
        self._warmup = 2

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._marks.append([self._mark(), None])

    def stop(self) -> None:
        self._marks[-1][1] = self._mark()

    def window_s(self) -> list[float]:
        """Seconds per step over the window; call after the host waited for the device."""
        for begin, end in self._marks:
            if self._warmup:
                self._warmup -= 1
                continue
            self.times.append(begin.elapsed_time(end) / 1e3 if self.cuda else end - begin)
        self._marks.clear()
        return list(self.times)


def gather(window: list[float], *, device: torch.device, world: int) -> list[list[float]]:
    """Every rank's window, on every rank: one small all_gather (all ranks log the same steps, so
    their windows are as long)."""
    if world == 1:
        return [window]
    mine = torch.tensor(window, dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def record(windows: list[list[float]], hostnames: list[str]) -> dict:
    """The fields of a metrics record: each rank's median compute seconds per step, and the
    stragglers among them (rank, hostname, ratio to the median rank)."""
    found = stragglers(windows)
    return {"rank_compute_s": [round(statistics.median(w), 6) for w in windows],
            "stragglers": [{"rank": r, "hostname": hostnames[r], "ratio": round(x, 3)} for r, x in found.items()]}
