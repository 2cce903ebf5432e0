"""Does the cluster have room for what the config asks? Checked before anything launches.

Without this check Ray Train waits, without end, for workers the cluster can never place. A
pure function of the scaling config and ``ray.cluster_resources()``; each variant must fit on
its own (the planner decides whether variants run side by side).
"""

from __future__ import annotations

from orchestrator.errors import UsageError


def check_fits(scaling, resources: dict[str, float], source: str) -> None:
    """Raise UsageError naming the key when ``scaling`` needs more CPUs or GPUs than exist."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    need_cpus = scaling.num_workers * scaling.cpus_per_worker
    if need_cpus > cpus:
        raise UsageError(
            f"{source}: scaling.num_workers {scaling.num_workers} x cpus_per_worker {scaling.cpus_per_worker:g} "
            f"needs {need_cpus:g} CPUs; the cluster has {cpus:g}")
    if scaling.use_gpu is True and scaling.num_workers > gpus:
        raise UsageError(
            f"{source}: scaling.use_gpu true with num_workers {scaling.num_workers} needs "
            f"{scaling.num_workers} GPUs; the cluster has {gpus:g}")
