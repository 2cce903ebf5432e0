"""Run the probe on every alive node of the Ray cluster, in parallel, and collect a PreflightReport
(docs/preflight.md). The task on each node only starts the child process, or answers from the
node's cache; the driver parses, judges and bounds everything, so no node can hang it.

The driver's own machine need not wait for Ray: where it is a node of the cluster (a Ray the
command starts, or a kept one on this host), ``LocalProbe`` runs the same ``probe_or_reuse`` in
a thread of the driver, started before ``ray.init``, and ``run_preflight`` takes its answer for
that node instead of sending it a task.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from orchestrator.preflight import health as health_mod, node as node_mod
from orchestrator.preflight.settings import ProbeSettings
from orchestrator.preflight.child import parse_probe, probe_command, probe_env, run_probe
from orchestrator.preflight.findings import NodeReport, PreflightReport
from orchestrator.preflight.rules import Issue, crash_cause, probe_failed, verdict

log = logging.getLogger(__name__)

# Time for Ray to place the task and start a worker process, on top of the probe's own timeout.
SCHEDULING_MARGIN_S = 60.0


def _probe_on_node(argv: list[str], timeout_s: float, disable_flash_attn: bool) -> dict:  # runs on the node [ray]
    return run_probe(argv, timeout_s, probe_env(disable_flash_attn))


class LocalProbe:
    """This machine's preflight (cache lookup, else the probe child), running in a thread from
    the moment it is made; ``started`` and ``ended`` are epoch seconds (``ended`` None while it
    runs). ``ended`` is when the plan could go on: the probe's facts before its kernel timing,
    when it times kernels (``partial``), else its end. The timing then goes on beside the
    workers' start, and ``final()`` has the complete result once it is over (``finished``)."""

    def __init__(self, settings: ProbeSettings, fresh: bool):
        self.settings = settings
        self.started: float = time.time()
        self.ended: Optional[float] = None
        self.finished: Optional[float] = None
        self.node_id: Optional[str] = None  # the Ray node it answered for, once run_preflight used it
        self._early: Optional[dict] = None
        self._raw: Optional[dict] = None
        self._error: Optional[BaseException] = None
        self._answer = threading.Event()  # the early facts, or the end
        self._thread = threading.Thread(target=self._run, args=(fresh,), name="preflight-local", daemon=True)
        self._thread.start()

    def _on_early(self, raw: dict) -> None:
        self._early, self.ended = raw, time.time()
        self._answer.set()

    def _run(self, fresh: bool) -> None:
        try:
            self._raw = node_mod.probe_or_reuse(probe_command(self.settings), self.settings, fresh,
                                                early=self._on_early)
        except Exception as e:  # noqa: BLE001 - reported as this node's failed probe, like a failed task
            self._error = e
        finally:
            self.finished = time.time()
            self.ended = self.ended or self.finished
            self._answer.set()

    @property
    def partial(self) -> bool:
        """Whether ``result`` answered before the kernel timing was over."""
        return self._early is not None

    def result(self, timeout_s: float) -> tuple[Optional[dict], Optional[Issue]]:
        """(raw, None) once the probe answered (its facts before the kernel timing, if it times);
        (None, issue) when it failed or outlived ``timeout_s``."""
        self._answer.wait(timeout_s)
        if self._early is not None:
            return self._early, None
        return self._outcome(timeout_s)

    def final(self, timeout_s: float) -> tuple[Optional[dict], Optional[Issue]]:
        """The complete result, the kernel timing included, waiting up to ``timeout_s`` for it."""
        self._thread.join(timeout_s)
        return self._outcome(timeout_s)

    def _outcome(self, timeout_s: float) -> tuple[Optional[dict], Optional[Issue]]:
        if self._thread.is_alive():
            return None, Issue("probe", crash_cause(f"the probe ({timeout_s:g} s)", None, True),
                               "the local probe did not finish")
        if self._error is not None:
            return None, Issue("probe", crash_cause("the probe", type(self._error).__name__, False),
                               str(self._error).strip())
        return self._raw, None


def run_preflight(settings: ProbeSettings = ProbeSettings(), *, command: Optional[list[str]] = None,
                  fresh: bool = False, local: Optional[LocalProbe] = None,
                  expect_gpus: Optional[int] = None) -> PreflightReport:
    """Probe every alive node of the connected Ray cluster (``fresh``: never reuse a node's cached
    result); ``command`` replaces the probe's argv; ``local``, this machine's probe already under
    way, answers for the node the driver runs on (made with the same settings and ``fresh``).
    Each node's health counts its GPUs against ``expect_gpus``, else against what Ray advertises there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return PreflightReport([], settings, ["the Ray cluster has no alive nodes: nothing can run"])
    if command:
        task, args = ray.remote(_probe_on_node), (command, settings.timeout_s, settings.disable_flash_attn)
    else:
        task, args = ray.remote(node_mod.probe_or_reuse), (probe_command(settings), settings, fresh)
    here = ray.get_runtime_context().get_node_id() if local is not None and not command else None
    if here is not None and not any(n["NodeID"] == here for n in nodes):
        log.warning("preflight: the driver's node is not among the cluster's alive nodes; probing by task only")
        here = None
    refs = {task.options(num_cpus=0, max_retries=0, name=f"preflight-probe-{n['NodeID'][:8]}",
                         scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args): n
            for n in nodes if n["NodeID"] != here}
    log.info("preflight: probing %d node(s)", len(nodes))
    deadline = time.monotonic() + settings.timeout_s + SCHEDULING_MARGIN_S
    pending = list(refs)
    while pending and time.monotonic() < deadline:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, deadline - time.monotonic()))
    for ref in pending:
        ray.cancel(ref, force=True)

    answers = {n["NodeID"]: _task_answer(ref, ref in pending, settings) for ref, n in refs.items()}
    if here is not None:
        answers[here], local.node_id = local.result(max(0.0, deadline - time.monotonic())), here
    reports = []
    for n in nodes:
        raw, issue = answers[n["NodeID"]]
        facts = None
        if raw is not None:
            facts, issue = parse_probe(raw, settings.timeout_s)
        res = n.get("Resources", {})
        reports.append(NodeReport(
            node_id=n["NodeID"], address=n.get("NodeManagerAddress", "?"), cpus=float(res.get("CPU", 0)),
            gpus=float(res.get("GPU", 0)), labels=dict(n.get("Labels") or {}), facts=facts,
            verdict=verdict(facts) if facts is not None else probe_failed(issue.check, issue.cause, issue.error),
            probe_seconds=raw.get("seconds") if raw else None, cache=raw.get("cache") if raw else None,
            health=health_mod.judge(facts, int(res.get("GPU", 0)) if expect_gpus is None else expect_gpus),
        ))
    notes = []
    if not any(r.gpus for r in reports) and not any((r.facts or {}).get("gpus") for r in reports):
        notes.append("no GPUs in the cluster: flash attention means PyTorch's fused CPU kernel here")
    return PreflightReport(reports, settings, notes)


def _task_answer(ref, timed_out: bool, settings: ProbeSettings) -> tuple[Optional[dict], Optional[Issue]]:
    """A probe task's output, or why there is none."""
    import ray

    if timed_out:
        return None, Issue("probe", crash_cause(f"the probe task ({settings.timeout_s + SCHEDULING_MARGIN_S:g} s "
                                                "including scheduling)", None, True),
                           "the Ray task did not finish: the node is unreachable or cannot start a worker")
    try:
        return ray.get(ref), None
    except Exception as e:  # the node died, or the task could not run there
        return None, Issue("probe", crash_cause("the probe task", type(e).__name__, False), str(e).strip())
