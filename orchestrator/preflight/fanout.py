"""Run the probe on every alive node of the Ray cluster, in parallel, and collect a PreflightReport.

Each probe is a Ray task pinned to its node (hard node affinity) that asks for no CPU, so it
is scheduled even when training holds every core. The task only starts the child process; the
driver parses, judges and bounds everything, so no node can hang it. A node whose software has
not changed since its last probe answers from its cache (orchestrator/preflight/cache.py)
unless ``fresh`` is set; a ``command`` of its own (tests) is always run.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from orchestrator.preflight import node as node_mod
from orchestrator.preflight.settings import ProbeSettings
from orchestrator.preflight.child import parse_probe, probe_command, probe_env, run_probe
from orchestrator.preflight.findings import NodeReport, PreflightReport
from orchestrator.preflight.rules import Issue, crash_cause, probe_failed, verdict

log = logging.getLogger(__name__)

# Time for Ray to place the task and start a worker process, on top of the probe's own timeout.
SCHEDULING_MARGIN_S = 60.0


def _probe_on_node(argv: list[str], timeout_s: float, disable_flash_attn: bool) -> dict:  # runs on the node [ray]
    return run_probe(argv, timeout_s, probe_env(disable_flash_attn))


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def run_preflight(settings: ProbeSettings = ProbeSettings(), *, command: Optional[list[str]] = None,
                  fresh: bool = False) -> PreflightReport:
    """Probe every alive node of the connected Ray cluster (``fresh``: never reuse a node's cached
    result); ``command`` replaces the probe's argv."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if not nodes:
        return PreflightReport([], settings, ["the Ray cluster has no alive nodes: nothing can run"])
    if command:
        task, args = ray.remote(_probe_on_node), (command, settings.timeout_s, settings.disable_flash_attn)
    else:
        task, args = ray.remote(node_mod.probe_or_reuse), (probe_command(settings), settings, fresh)
    refs = {}
    for n in nodes:
        refs[task.options(num_cpus=0, max_retries=0, name=f"preflight-probe-{n['NodeID'][:8]}",
                          scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                          ).remote(*args)] = n
    log.info("preflight: probing %d node(s)", len(nodes))
    deadline = time.monotonic() + settings.timeout_s + SCHEDULING_MARGIN_S
    pending = list(refs)
    while pending and time.monotonic() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, deadline - time.monotonic()))
    for ref in pending:
        ray.cancel(ref, force=True)

    reports = []
    for ref, n in refs.items():
        raw = None
        if ref in pending:
            issue = Issue("probe", crash_cause(f"the probe task ({settings.timeout_s + SCHEDULING_MARGIN_S:g} s "
                                               "including scheduling)", None, True),
                          "the Ray task did not finish: the node is unreachable or cannot start a worker")
        else:
            try:
                raw = ray.get(ref)
                issue = None
            except Exception as e:  # the node died, or the task could not run there
                issue = Issue("probe", crash_cause("the probe task", type(e).__name__, False), str(e).strip())
        facts = None
        if raw is not None:
            facts, issue = parse_probe(raw, settings.timeout_s)
        res = n.get("Resources", {})
        reports.append(NodeReport(
            node_id=n["NodeID"], address=n.get("NodeManagerAddress", "?"), cpus=float(res.get("CPU", 0)),
            gpus=float(res.get("GPU", 0)), labels=dict(n.get("Labels") or {}), facts=facts,
            verdict=verdict(facts) if facts is not None else probe_failed(issue.check, issue.cause, issue.error),
            probe_seconds=raw.get("seconds") if raw else None, cache=raw.get("cache") if raw else None,
        ))
    notes = []
    if not any(r.gpus for r in reports) and not any((r.facts or {}).get("gpus") for r in reports):
        notes.append("no GPUs in the cluster: flash attention means PyTorch's fused CPU kernel here")
    return PreflightReport(reports, settings, notes)
