"""DDP or FSDP, and does it fit: each planned variant's workers against their devices' memory
(docs/performance.md, "Strategy" and "Memory estimate").

Pure: the planner calls ``resolve`` once the workers are placed. A worker may use
``scaling.memory_headroom`` of its device: the rest is for what no estimate sees (allocator
fragmentation, other processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from orchestrator.errors import InfeasibleRequest
from orchestrator import memory
from trainer import parallel
from trainer.config import TrainConfig
from trainer.model_args import ModelArgs

# ``auto``'s "fits comfortably": DDP's model state may take this share of a worker's memory.
COMFORT_FRACTION = 0.5

_ADVICE = ("lower the model's size, train.micro_batch_size or train.seq_len, set train.activation_checkpointing: "
           "true (every block; an integer N: every Nth), add workers (fsdp shards over them) or raise "
           "scaling.memory_headroom")


@dataclass(frozen=True)
class Workload:
    """What one variant trains: enough to estimate its memory."""

    model: ModelArgs
    train: TrainConfig


@dataclass(frozen=True)
class Budget:
    """The bytes one worker of a variant may use, and where that limit comes from."""

    bytes: int
    device_bytes: int
    what: str  # "GPU" or "RAM shared by N worker(s)"
    node: str

    def describe(self, headroom: float) -> str:
        return f"{memory.gib(self.bytes)} ({headroom:g} x {memory.gib(self.device_bytes)} {self.what} on node {self.node[:12]})"


@dataclass(frozen=True)
class Choice:
    strategy: str
    estimate: memory.MemoryEstimate
    reason: str


def budget(nodes: list[str], *, use_gpu: bool, gpu_memory: dict[str, Optional[int]], ram: dict[str, Optional[int]],
           workers_on: dict[str, int], headroom: float) -> Optional[Budget]:
    """The tightest per-worker limit over the nodes a variant's workers are placed on; None
    when preflight could not measure any of them (nothing to check against)."""
    limits = []
    for node in dict.fromkeys(nodes):
        if use_gpu:
            total, share, what = gpu_memory.get(node), 1, "GPU"
        else:
            share = max(1, workers_on.get(node, 1))
            total, what = ram.get(node), f"RAM shared by {share} worker(s)"
        if total:
            limits.append(Budget(int(headroom * total / share), total, what, node))
    return min(limits, key=lambda b: b.bytes) if limits else None


def resolve(name: str, requested: str, work: Workload, *, num_workers: int, attention: str, use_gpu: bool,
            limit: Optional[Budget], headroom: float) -> Choice:
    """The strategy for one variant, or InfeasibleRequest (exit 2) with the estimates."""
    device = "cuda" if use_gpu else "cpu"

    def est(strategy: str) -> memory.MemoryEstimate:
        return memory.estimate(work.model, work.train, strategy=strategy, world_size=num_workers,
                               attention=attention, device=device)

    estimates = {n: est(n) for n in parallel.NAMES}
    if limit is None:
        chosen = parallel.DEFAULT if requested == "auto" else requested
        return Choice(chosen, estimates[chosen], "device memory unknown: not checked"
                      + (f" (auto: {chosen})" if requested == "auto" else ""))
    where = limit.describe(headroom)
    if requested != "auto":
        e = estimates[requested]
        if e.total <= limit.bytes:
            return Choice(requested, e, f"scaling.strategy {requested}: {memory.gib(e.total)} per worker of {where}")
        fits = [o for o in estimates.values() if o.strategy != requested and o.total <= limit.bytes
                and (not parallel.get(o.strategy).shards or num_workers > 1)]
        hint = f"scaling.strategy {fits[0].strategy} would fit ({memory.gib(fits[0].total)}); " if fits else ""
        raise InfeasibleRequest(f"variant {name}: does not fit in memory under scaling.strategy {requested}: needs "
                                f"{e.describe()}; a worker may use {where}; {hint}{_ADVICE}")
    # auto: the replica while it fits comfortably, else the shards
    rep, sh = estimates[parallel.sharding(False)], estimates[parallel.sharding(True)]
    r, s = rep.strategy, sh.strategy
    if rep.model_state <= COMFORT_FRACTION * limit.bytes and rep.total <= limit.bytes:
        return Choice(r, rep, f"auto: {r}, model state {memory.gib(rep.model_state)} fits comfortably in {where}")
    if num_workers > 1 and sh.total <= limit.bytes:
        why = (f"{r}'s params+grads+optimizer {memory.gib(rep.model_state)} exceed half"
               if rep.total <= limit.bytes else f"{r}'s {memory.gib(rep.total)} exceed all")
        return Choice(s, sh, f"auto: {s}, {why} of {where}; sharded: {memory.gib(sh.total)} per worker")
    if rep.total <= limit.bytes:
        return Choice(r, rep, f"auto: {r}, {memory.gib(rep.total)} per worker fits {where} "
                              "(one worker: nothing to shard over)")
    raise InfeasibleRequest(f"variant {name}: does not fit in memory under any strategy: {r} needs {rep.describe()}; "
                            f"{s} needs {sh.describe()}; a worker may use {where}; {_ADVICE}")
