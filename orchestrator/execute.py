"""Running a plan from one driver: its variants concurrently (one thread per ``fit()``, each
variant on the CPUs/GPUs the plan pinned it to) or one after the other.

Ray Train waits for placement without end by default; the wait is bounded here by
``scaling.placement_timeout_s`` (docs/variants.md, "The plan"). A worker that stops answering is
found after half of ``scaling.hang_timeout_s``, before its peers' collectives time out at the
whole of it (docs/elastic.md, "Hangs").
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator, Optional

from orchestrator import launch
from orchestrator.results import VariantResult
from orchestrator.plan import Plan, PlannedVariant
from orchestrator import ray_internals
from trainer.worker_spec import WorkerSpec

log = logging.getLogger(__name__)

# The controller actor gets these from the driver's environment (ray.train.v2 propagates them).
START_TIMEOUT_ENV = ray_internals.START_TIMEOUT_ENV
HEALTH_CHECK_TIMEOUT_ENV = ray_internals.HEALTH_CHECK_TIMEOUT_ENV


@contextmanager
def controller_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_plan(plan: Plan, specs: dict[str, WorkerSpec], *, max_failures: int, keep_checkpoints: int,
             placement_timeout_s: float, hang_timeout_s: float = 300.0, resize_interval_s: float = 60.0,
             worker_env: Optional[dict[str, str]] = None) -> dict[str, VariantResult]:
    """Every variant's summary record, keyed by name, in the plan's order; ``worker_env`` is set
    in every worker's environment."""
    results = {v.name: VariantResult(status="skipped", attention=v.attention, env=v.env, num_workers=v.num_workers,
                                     use_gpu=v.use_gpu, reason=v.reason)
               for v in plan.variants if v.status == "skipped"}  # flash attention works on no node

    def one(v: PlannedVariant) -> VariantResult:
        log.info("[%s] starting %s worker(s), %s", v.name, v.count(), " ".join(f"{k}={x}" for k, x in v.env.items()))
        record = launch.run_variant(v, specs[v.name], max_failures=max_failures, keep_checkpoints=keep_checkpoints,
                                    placement_timeout_s=placement_timeout_s, hang_timeout_s=hang_timeout_s,
                                    resize_interval_s=resize_interval_s, worker_env=worker_env)
        if v.reason:  # e.g. why a flash variant runs standard attention; 'attention' stays the request
            record.reason = v.reason
        return record

    runnable = plan.runnable()
    with controller_env({START_TIMEOUT_ENV: f"{placement_timeout_s:g}",
                         HEALTH_CHECK_TIMEOUT_ENV: f"{hang_timeout_s / 2:g}"}):
        if plan.mode == "concurrent" and len(runnable) > 1:
            pool = ThreadPoolExecutor(max_workers=len(runnable), thread_name_prefix="variant")
            futures = {v.name: pool.submit(one, v) for v in runnable}
            try:
                results.update({name: f.result() for name, f in futures.items()})
            finally:
                # Not waiting: on Ctrl-C the driver must get out; ending the Ray session
                # (the caller's) then ends the fits still running in these threads.
                pool.shutdown(wait=False, cancel_futures=True)
        else:
            for v in runnable:
                results[v.name] = one(v)
                if results[v.name].status == "interrupted":  # the caller stops the run
                    break
    return {v.name: results[v.name] for v in plan.variants if v.name in results}
