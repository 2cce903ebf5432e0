"""How many workers a variant gets, and does the cluster have room for them? Checked before anything launches.

Without the room check Ray Train waits, without end, for workers the cluster can never place.
Pure functions of the scaling config and what the cluster holds (``ray.cluster_resources()``,
or the planner's candidate nodes); each variant must fit on its own (the planner decides
whether variants run side by side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from orchestrator.errors import UsageError

# scaling.num_workers auto without a GPU: the two CPU workers that were the default before auto.
CPU_WORKERS = 2
# scaling.num_workers auto takes a worker per GPU found up to this many (one host's worth):
# spreading a run over a larger cluster is a choice to write down, not a default.
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class Workers:
    count: int  # what the plan must hold: the size, or an elastic range's min
    reason: Optional[str] = None  # why scaling.num_workers auto chose ``count``; None: the user's number
    most: Optional[int] = None  # an elastic range's max; None: a fixed size


def _gpus(n: float) -> str:
    return f"{n:g} GPU" + ("" if n == 1 else "s")


def workers(num_workers, use_gpu, gpus: float, gpu_slots: int) -> Workers:
    """``scaling.num_workers`` resolved: a number as given; auto, one GPU worker per GPU found
    (``gpus`` on the nodes a variant may use, ``gpu_slots`` of them with ``cpus_per_worker``
    CPUs beside), 1 to ``MAX_AUTO_WORKERS``; without GPUs, or with use_gpu false, ``CPU_WORKERS``;
    a range [min, max], elastic."""
    if isinstance(num_workers, tuple):
        return Workers(num_workers[0], most=num_workers[1])
    if num_workers != "auto":
        return Workers(num_workers)
    if use_gpu is False:
        return Workers(CPU_WORKERS, "use_gpu false")
    if gpus < 1 or gpu_slots < 1:
        return Workers(CPU_WORKERS, "no GPU found" if gpus < 1 else f"{_gpus(gpus)} found, no CPUs beside them")
    reason = f"{_gpus(gpus)} found"
    if gpu_slots < gpus:
        reason += f", CPUs for {gpu_slots} worker(s) beside them"
    if gpu_slots > MAX_AUTO_WORKERS:
        reason += f", auto takes at most {MAX_AUTO_WORKERS}"
    return Workers(min(gpu_slots, MAX_AUTO_WORKERS), reason)


def gpu_slots(cpus: float, gpus: float, cpus_per_worker: float) -> int:
    """How many workers of one GPU and ``cpus_per_worker`` CPUs fit in ``cpus`` and ``gpus``."""
    return min(math.floor(gpus + 1e-9), math.floor(cpus / cpus_per_worker + 1e-9))


def check_fits(scaling, resources: dict[str, float], source: str) -> None:
    """Raise UsageError naming the key when ``scaling`` needs more CPUs or GPUs than exist."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    chosen = workers(scaling.num_workers, scaling.use_gpu, gpus, gpu_slots(cpus, gpus, scaling.cpus_per_worker))
    n = chosen.count
    auto = f" (num_workers auto: {chosen.reason})" if chosen.reason else ""
    # An elastic run must be able to hold its min; it grows into what else there is.
    count = f"{n}" if chosen.most is None else f"[{n}, {chosen.most}]: min {n}"
    need_cpus = n * scaling.cpus_per_worker
    if need_cpus > cpus:
        raise UsageError(
            f"{source}: scaling.num_workers {count} x cpus_per_worker {scaling.cpus_per_worker:g} "
            f"needs {need_cpus:g} CPUs; the cluster has {cpus:g}{auto}")
    if scaling.use_gpu is True and n > gpus:
        raise UsageError(
            f"{source}: scaling.use_gpu true with num_workers {count} needs {n} GPUs; the cluster has {gpus:g}{auto}")
