"""The plan: which variants run, with which attention env flags, on which nodes, how.

A pure function of the config, the preflight verdicts and the cluster's nodes, so every
decision here is unit-tested without Ray. It is printed before anything starts and saved as
``plan.json`` in the run directory.

Rules, in order, per variant:
1. Candidate nodes: alive nodes matching ``scaling.label_selector`` plus the variant's own
   selector. None: the request is infeasible (exit 2).
2. A flash variant keeps only nodes where preflight says flash works (``flash_ok``). None:
   when the run also has a standard variant (a comparison), the flash variant is ``skipped``
   with preflight's reasons and the others still run; when it is the run's only kind of
   attention, it trains with standard attention instead (ATTN_IMPL=standard,
   DISABLE_FLASH_ATTN=1) and the reason is recorded: detect, disable, log, still train.
   With flash attention disabled for the run (--disable-flash-attn, DISABLE_FLASH_ATTN=1)
   every variant trains with standard attention, placed as it would be without the switch.
3. How many workers: ``scaling.num_workers`` as given; ``auto``, one per GPU the candidates
   hold (``capacity.workers``), else 2 CPU workers; a range [min, max] is elastic, and the
   plan holds, places and checks the memory of its min (an FSDP shard is largest there).
   GPU or CPU: ``use_gpu: true|false`` as given; ``auto`` takes GPUs when all workers fit on
   the candidates' GPUs (one GPU and ``cpus_per_worker`` CPUs each), else CPUs. The plan says
   why in ``workers_reason`` when auto chose the count or left GPUs idle.
4. The workers must fit the candidates' total capacity, else infeasible (exit 2): Ray Train
   would otherwise wait for placement that can never happen.
5. Once placed, each variant's strategy is resolved (``scaling.strategy``; auto: ddp or fsdp)
   and its workers' memory estimate is checked against their devices (``strategy.py``): a
   variant that fits under no strategy is infeasible (exit 2) before anything is allocated.
   ``train.micro_batch_size: auto`` becomes the largest that fits (``micro_batch.py``).
Then all runnable variants are packed onto the cluster at once: concurrently if they fit, else
one after the other (docs/variants.md, "The plan").
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

from orchestrator import capacity, labels, micro_batch, strategy as strategy_mod
from orchestrator.config import ScalingConfig, VariantConfig
from orchestrator.errors import InfeasibleRequest
from orchestrator.preflight.findings import PreflightReport
from orchestrator.strategy import Workload
from trainer import parallel
from trainer.attention import guard
from trainer.config import TrainConfig

# Orders of variants tried when packing them together; beyond this many variants, the most
# constrained-first order alone (the search is factorial).
_MAX_PACKING_ORDERS = 120


def attention_env(attention: str) -> dict[str, str]:
    """The env vars a worker gets: ATTN_IMPL always, DISABLE_FLASH_ATTN=1 for standard."""
    env = {"ATTN_IMPL": attention}
    if attention == "standard":
        env["DISABLE_FLASH_ATTN"] = "1"
    return env


@dataclass
class NodeCapacity:
    """One alive node as the planner sees it: what preflight found, reduced to what placement needs.

    Made from preflight's findings by ``nodes_from_preflight`` (tests build them directly);
    consumed by ``make_plan``. ``flash_ok`` is True when some flash kernel passed its checks on the node
    (the flash_attn package or PyTorch's fused SDPA kernels); ``flash_reason`` says why not.
    """

    node_id: str
    cpus: float
    gpus: float
    labels: dict[str, str] = field(default_factory=dict)
    flash_ok: bool = True
    flash_kernel: Optional[str] = None
    flash_reason: Optional[str] = None
    gpu_memory_bytes: Optional[int] = None  # the node's smallest GPU; None: not measured
    memory_bytes: Optional[int] = None  # the node's RAM; None: not measured
    left_out: Optional[str] = None  # why the plan places nothing here (preflight found it unhealthy)

    def all_labels(self) -> dict[str, str]:
        """The labels a selector sees: Ray adds the node id to every node's labels."""
        return {labels.NODE_ID_KEY: self.node_id, **self.labels}


def nodes_from_preflight(report: PreflightReport, allow_unhealthy: bool = False) -> list[NodeCapacity]:
    """Preflight's findings per node, reduced to what placement needs; an unhealthy node is left
    out unless ``allow_unhealthy`` (--allow-unhealthy)."""
    return [NodeCapacity(node_id=n.node_id, cpus=n.cpus, gpus=n.gpus, labels=dict(n.labels),
                         flash_ok=n.verdict.flash_ok, flash_kernel=n.verdict.flash_kernel,
                         flash_reason=n.verdict.reason, gpu_memory_bytes=n.smallest_gpu_bytes(),
                         memory_bytes=(n.facts or {}).get("memory_bytes"),
                         left_out=f"unhealthy: {n.health.reason}" if n.unhealthy and not allow_unhealthy else None)
            for n in report.nodes]


@dataclass
class PlannedVariant:
    name: str
    attention: str  # what the variant asked for
    env: dict[str, str]  # what its workers get
    num_workers: int  # elastic: the min, what the plan holds
    use_gpu: bool
    cpus_per_worker: float
    workers_reason: Optional[str] = None  # why this many workers, on GPU or CPU, when the config left it open
    status: str = "planned"  # planned | skipped
    reason: Optional[str] = None  # why skipped, or why its attention differs from the request
    # One selector for all workers, or one per worker (concurrent plans pin each worker to a node).
    label_selector: Union[dict[str, str], list[dict[str, str]], None] = None
    nodes: list[str] = field(default_factory=list)  # the node of each worker, as packed
    strategy: str = parallel.DEFAULT  # scaling.strategy, resolved (strategy.py): a name in trainer.parallel
    strategy_reason: Optional[str] = None
    memory: Optional[dict] = None  # the per-worker estimate (orchestrator/memory.py) and its limit
    # train.micro_batch_size where the config says auto, resolved (micro_batch.py), and why
    micro_batch_size: Optional[int] = None
    micro_batch_reason: Optional[str] = None
    max_workers: Optional[int] = None  # elastic: Ray Train grows the group up to this; None: a fixed size

    def workers_arg(self) -> Union[int, tuple[int, int]]:
        """Ray Train's ``ScalingConfig(num_workers=...)``: a size, or (min, max) for an elastic run."""
        return self.num_workers if self.max_workers is None else (self.num_workers, self.max_workers)

    def count(self) -> str:
        return f"{self.num_workers}" if self.max_workers is None else f"{self.num_workers}-{self.max_workers}"

    def resolved(self, train: TrainConfig) -> tuple[TrainConfig, dict[str, str]]:
        """(``train`` as the workers run it, what the plan resolved from auto: key -> "value (why)")."""
        if not self.micro_batch_size:
            return train, {}
        return (train.model_copy(update={"micro_batch_size": self.micro_batch_size}),
                {"train.micro_batch_size": f"{self.micro_batch_size} ({self.micro_batch_reason})"})

    def demand(self) -> dict[str, float]:
        """What one worker asks Ray for (the same dict launch passes as resources_per_worker)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}


@dataclass
class Plan:
    variants: list[PlannedVariant]
    mode: str  # concurrent | sequential
    notes: list[str] = field(default_factory=list)
    flash_disabled: Optional[str] = None  # why every variant runs standard attention, if it does
    cluster: list[NodeCapacity] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def runnable(self) -> list[PlannedVariant]:
        return [v for v in self.variants if v.status == "planned"]

    def describe(self) -> list[str]:
        lines = [f"plan: {len(self.variants)} variant(s), {self.mode}"]
        for v in self.variants:
            where = f"{v.count()} x {'GPU' if v.use_gpu else 'CPU'} worker(s)" + (", elastic" if v.max_workers else "")
            if v.nodes:
                counts = {n: v.nodes.count(n) for n in v.nodes}
                where += " on " + ", ".join(f"{n[:12]} ({c})" for n, c in counts.items())
            env = " ".join(f"{k}={val}" for k, val in v.env.items())
            line = f"  {v.name}: {v.status}, {where}, {env}"
            if v.status == "planned":
                line += f", strategy {v.strategy}"
            if v.reason:
                line += f" ({v.reason})"
            lines.append(line)
            if v.workers_reason:
                lines.append(f"    workers: {v.workers_reason}")
            if v.status == "planned" and v.strategy_reason:
                lines.append(f"    strategy: {v.strategy_reason}")
            if v.status == "planned" and v.micro_batch_size:
                lines.append(f"    train.micro_batch_size: {v.micro_batch_size} ({v.micro_batch_reason})")
        lines += [f"  note: {n}" for n in self.notes]
        return lines


# ---------------------------------------------------------------- packing


def _slots(free: dict[str, float], demand: dict[str, float]) -> int:
    """How many workers of ``demand`` fit in ``free``."""
    return min(math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0)


def _pack(count: int, demand: dict[str, float], candidates: Sequence[str],
          free: dict[str, dict[str, float]]) -> Optional[list[str]]:
    """Place ``count`` workers on ``candidates``, fullest-fitting node first (like Ray's PACK
    strategy: fewer nodes, more local traffic). Takes the room from ``free``; None if they do
    not fit (``free`` is then unchanged)."""
    order = sorted(candidates, key=lambda n: -_slots(free[n], demand))
    placed: list[str] = []
    for node in order:
        take = min(count - len(placed), _slots(free[node], demand))
        placed += [node] * take
        if len(placed) == count:
            break
    if len(placed) < count:
        return None
    for node in placed:
        for k, v in demand.items():
            free[node][k] = free[node].get(k, 0.0) - v
    return placed


def _capacity(nodes: list[NodeCapacity]) -> dict[str, dict[str, float]]:
    return {n.node_id: {"CPU": n.cpus, "GPU": n.gpus} for n in nodes}


def _pack_together(variants: list[PlannedVariant], candidates: dict[str, list[str]],
                   nodes: list[NodeCapacity]) -> Optional[dict[str, list[str]]]:
    """Every variant on its own resources at the same time, or None. Tries the most
    constrained variant first, then other orders, since a greedy pass can paint itself into
    a corner (a flexible variant taking the only node another one can use)."""
    first = sorted(variants, key=lambda v: (len(candidates[v.name]), -v.num_workers))
    orders = itertools.chain([first], itertools.islice(itertools.permutations(variants), _MAX_PACKING_ORDERS))
    for order in orders:
        free = _capacity(nodes)
        placed = {}
        for v in order:
            got = _pack(v.num_workers, v.demand(), candidates[v.name], free)
            if got is None:
                break
            placed[v.name] = got
        else:
            return placed
    return None


# ---------------------------------------------------------------- the planner


def _fmt_selector(selector: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector.items())


def _flash_reason(nodes: list[NodeCapacity]) -> str:
    reasons = [f"{n.node_id[:12]}: {n.flash_reason or 'flash check failed'}" for n in nodes if not n.flash_ok]
    return "flash attention works on no node (" + "; ".join(reasons) + ")"


def _total(nodes: list[NodeCapacity], key: str) -> float:
    return sum(n.cpus if key == "CPU" else n.gpus for n in nodes)


def _workers(scaling: ScalingConfig, nodes: list[NodeCapacity]) -> capacity.Workers:
    """scaling.num_workers for a variant that may use ``nodes``."""
    slots = sum(capacity.gpu_slots(n.cpus, n.gpus, scaling.cpus_per_worker) for n in nodes)
    return capacity.workers(scaling.num_workers, scaling.use_gpu, _total(nodes, "GPU"), slots)


def _resolve_strategies(runnable: list[PlannedVariant], nodes: list[NodeCapacity], scaling: ScalingConfig,
                        workloads: Optional[dict[str, Workload]], concurrent: bool) -> None:
    """Each variant's strategy, micro-batch where auto, and memory estimate (strategy.py), or InfeasibleRequest."""
    gpu_memory = {n.node_id: n.gpu_memory_bytes for n in nodes}
    ram = {n.node_id: n.memory_bytes for n in nodes}
    for v in runnable:
        if workloads is None:  # nothing to estimate from: the strategy as asked
            v.strategy = parallel.DEFAULT if scaling.strategy == "auto" else scaling.strategy
            continue
        sharing = runnable if concurrent else [v]
        workers_on = Counter(n for u in sharing if not u.use_gpu for n in u.nodes)
        limit = strategy_mod.budget(v.nodes, use_gpu=v.use_gpu, gpu_memory=gpu_memory, ram=ram,
                                    workers_on=workers_on, headroom=scaling.memory_headroom)
        work = workloads[v.name]
        placed = dict(num_workers=v.num_workers, attention=v.env["ATTN_IMPL"], use_gpu=v.use_gpu, limit=limit,
                      headroom=scaling.memory_headroom)
        if work.train.micro_batch_size == "auto":
            v.micro_batch_size, v.micro_batch_reason = micro_batch.resolve(v.name, scaling.strategy, work, **placed)
            work = Workload(work.model, v.resolved(work.train)[0])
        choice = strategy_mod.resolve(v.name, scaling.strategy, work, **placed)
        v.strategy, v.strategy_reason = choice.strategy, choice.reason
        v.memory = {"per_worker": choice.estimate.to_json(), "limit_bytes": limit.bytes if limit else None,
                    "limit": limit.describe(scaling.memory_headroom) if limit else None}


def make_plan(variants: list[VariantConfig], scaling: ScalingConfig, nodes: list[NodeCapacity],
              workloads: Optional[dict[str, Workload]] = None, flash_disabled: bool = False) -> Plan:
    """Variants onto the cluster (see the module docstring for the rules).

    ``workloads`` (variant name -> model and train settings) lets the plan choose each
    variant's strategy and check that its workers fit in memory; without it the strategy is
    taken as asked (auto: ddp) and memory is not checked. ``flash_disabled``: rule 2's switch;
    the request stays in ``attention``, the reason in ``reason``.
    Raises InfeasibleRequest (exit 2) for a request no state of this cluster can satisfy.
    """
    if not nodes:
        raise InfeasibleRequest("the Ray cluster has no alive nodes")
    cluster, nodes = nodes, [n for n in nodes if not n.left_out]
    if not nodes:
        raise InfeasibleRequest("every node is left out: " + "; ".join(f"node {n.node_id[:8]} {n.left_out}"
                                                                      for n in cluster)
                                + " (--allow-unhealthy runs on them anyway)")
    planned: list[PlannedVariant] = []
    candidates: dict[str, list[str]] = {}
    restricted: dict[str, bool] = {}  # flash excluded nodes the selector alone would allow
    for vc in variants:
        selector = {**scaling.label_selector, **vc.label_selector}
        matching = [n for n in nodes if labels.matches(selector, n.all_labels())]
        if not matching:
            raise InfeasibleRequest(f"variant {vc.name}: label selector {{{_fmt_selector(selector)}}} matches none "
                                    f"of the cluster's {len(nodes)} node(s)")
        pv = PlannedVariant(name=vc.name, attention=vc.attention, env=attention_env(vc.attention),
                            num_workers=0, use_gpu=False, cpus_per_worker=scaling.cpus_per_worker,
                            label_selector=selector or None)
        if flash_disabled:
            pv.env, pv.reason = attention_env("standard"), guard.DISABLED_REASON
        usable = [n for n in matching if n.flash_ok] if pv.env["ATTN_IMPL"] == "flash" else matching
        chosen = _workers(scaling, usable or matching)
        pv.num_workers, pv.max_workers = chosen.count, chosen.most
        if chosen.reason:
            pv.workers_reason = f"scaling.num_workers auto, {chosen.reason}"
        if not usable and any(v.attention == "standard" for v in variants):
            pv.status, pv.reason = "skipped", _flash_reason(matching)
            planned.append(pv)
            continue
        if not usable:
            pv.env, usable = attention_env("standard"), matching
            pv.reason = "standard attention: " + _flash_reason(matching)
        ids = [n.node_id for n in usable]
        alone = None
        if scaling.use_gpu is not False:  # auto: GPUs when the candidates hold all workers on GPUs
            pv.use_gpu = True
            alone = _pack(pv.num_workers, pv.demand(), ids, _capacity(usable))
        if alone is None and scaling.use_gpu is not True:
            gpus = _total(usable, "GPU")
            if gpus and not pv.workers_reason:
                pv.workers_reason = (f"scaling.use_gpu auto: {pv.num_workers} GPU worker(s) do not fit the "
                                     f"{gpus:g} GPU(s) found, so CPU workers; set scaling.num_workers auto "
                                     "to take the GPUs")
            pv.use_gpu = False
            alone = _pack(pv.num_workers, pv.demand(), ids, _capacity(usable))
        if alone is None:
            where = (f"the {len(usable)} flash-capable node(s)" if len(usable) < len(matching)
                     else f"the {len(usable)} node(s)" + (f" matching {{{_fmt_selector(selector)}}}" if selector else ""))
            need = " + ".join(f"{v:g} {k}" for k, v in pv.demand().items())
            have = ", ".join(f"{_total(usable, k):g} {k}" for k in pv.demand())
            raise InfeasibleRequest(
                f"variant {vc.name}: {pv.num_workers if pv.max_workers is None else f'min {pv.num_workers} of {pv.count()}'} "
                f"worker(s) x ({need}) do not fit on {where} "
                f"(they have {have} in all); lower scaling.num_workers or scaling.cpus_per_worker, or add nodes"
            )
        pv.nodes = alone
        candidates[vc.name] = [n.node_id for n in usable]
        restricted[vc.name] = len(usable) < len(matching)
        planned.append(pv)

    runnable = [v for v in planned if v.status == "planned"]
    plan = Plan(variants=planned, mode="sequential", cluster=list(cluster),
                flash_disabled=guard.DISABLED_REASON if flash_disabled else None)
    # An elastic variant grows into whatever the cluster holds: side by side it would take
    # another's room, and pinning its workers to nodes would stop it from moving.
    elastic = any(v.max_workers for v in runnable)
    together = _pack_together(runnable, candidates, nodes) if len(runnable) > 1 and not elastic else None
    memory_bound = False  # the variants fit the CPUs together but not the RAM
    if together is not None:
        alone = {v.name: v.nodes for v in runnable}
        for v in runnable:
            v.nodes = together[v.name]
        try:  # side by side, CPU workers share their nodes' RAM
            _resolve_strategies(runnable, nodes, scaling, workloads, concurrent=True)
        except InfeasibleRequest:
            together, memory_bound = None, True
            for v in runnable:
                v.nodes = alone[v.name]
            plan.notes.append("the variants fit the cluster's CPUs at once but not its memory: "
                              "they run one after the other")
    if together is None:
        _resolve_strategies(runnable, nodes, scaling, workloads, concurrent=False)
    if together is not None:
        plan.mode = "concurrent"
        plan.notes.append(f"the cluster holds all {len(runnable)} variants at once: they run concurrently, "
                          "each worker pinned to its own node's CPUs/GPUs")
        for v in runnable:
            v.label_selector = [{labels.NODE_ID_KEY: n} for n in v.nodes]
    else:
        if len(runnable) > 1 and elastic:
            plan.notes.append("elastic variants run one after the other, each growing into the whole cluster")
        elif len(runnable) > 1 and not memory_bound:
            demand = "; ".join(f"{v.name}: {v.count()} x {'GPU' if v.use_gpu else 'CPU'}" for v in runnable)
            plan.notes.append(f"the cluster cannot hold all {len(runnable)} variants at once ({demand}; cluster: "
                              f"{_total(nodes, 'CPU'):g} CPU, {_total(nodes, 'GPU'):g} GPU): "
                              "they run one after the other")
        for v in runnable:
            # Alone on the cluster, a variant may go anywhere its selector allows; only the
            # flash restriction has to be spelled out, as the candidate nodes' ids.
            if restricted[v.name] or len(nodes) < len(cluster):
                v.label_selector = {**(v.label_selector or {}), **labels.one_of(labels.NODE_ID_KEY, candidates[v.name])}
    plan.notes += [f"node {n.node_id[:8]} is left out, {n.left_out} (--allow-unhealthy keeps it)"
                   for n in cluster if n.left_out]
    for v in planned:
        if v.status == "skipped":
            plan.notes.append(f"{v.name} is skipped: {v.reason}")
    return plan
