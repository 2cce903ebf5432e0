"""The plan: which variants run, with which attention env flags, on which nodes, how.

A pure function of the config, the preflight verdicts and the cluster's resources, so every
decision here is unit-tested without Ray. It is printed before anything starts and saved as
``plan.json`` in the run directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


def attention_env(attention: str) -> dict[str, str]:
    """The env vars a worker gets: ATTN_IMPL always, DISABLE_FLASH_ATTN=1 for standard."""
    env = {"ATTN_IMPL": attention}
    if attention == "standard":
        env["DISABLE_FLASH_ATTN"] = "1"
    return env


@dataclass
class NodeCapacity:
    """One alive node as the planner sees it: what preflight found, reduced to what placement needs.

    Produced by preflight (``orchestrator/preflight``) from each node's probe; consumed by
    ``make_plan``. ``flash_ok`` is True when some flash kernel passed its checks on the node
    (the flash_attn package or PyTorch's fused SDPA kernels); ``flash_reason`` says why not.
    """

    node_id: str
    cpus: float
    gpus: float
    labels: dict[str, str] = field(default_factory=dict)
    flash_ok: bool = True
    flash_kernel: Optional[str] = None
    flash_reason: Optional[str] = None


@dataclass
class PlannedVariant:
    name: str
    attention: str  # what the variant asked for
    env: dict[str, str]  # what its workers get
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    status: str = "planned"  # planned | skipped
    reason: Optional[str] = None  # why skipped, or why the attention differs from the request
    label_selector: Optional[dict[str, str]] = None
    nodes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    variants: list[PlannedVariant]
    mode: str  # concurrent | sequential
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> list[str]:
        lines = [f"plan: {len(self.variants)} variant(s), {self.mode}"]
        for v in self.variants:
            where = f"{v.num_workers} x {'GPU' if v.use_gpu else 'CPU'} worker(s)"
            if v.nodes:
                where += f" on {', '.join(n[:12] for n in v.nodes)}"
            env = " ".join(f"{k}={val}" for k, val in v.env.items())
            line = f"  {v.name}: {v.status}, {where}, {env}"
            if v.reason:
                line += f" ({v.reason})"
            lines.append(line)
        lines += [f"  note: {n}" for n in self.notes]
        return lines
