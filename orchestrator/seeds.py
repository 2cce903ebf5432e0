"""``train --seeds K``: each variant trained K times, with seeds train.seed, train.seed + 1, ...

Each run is a variant of its own, ``<variant>-s<i>`` with its seed in its train overrides, so
everything downstream treats it as any variant (docs/validation.md, "Over seeds").
"""

from __future__ import annotations

from orchestrator.config import RunConfig, VariantConfig, resolved_sections
from orchestrator.errors import UsageError

# A variant's runs, in seed order: run name -> its train.seed.
Runs = dict[str, int]


def run_name(variant: str, i: int) -> str:
    return f"{variant}-s{i}"


def check(k: int) -> None:
    if k < 1:
        raise UsageError(f"--seeds {k}: must be at least 1 (the times each variant trains, with seeds "
                         "train.seed, train.seed + 1, ...)")


def expand(cfg: RunConfig, variants: list[VariantConfig], k: int,
           source: str = "config") -> tuple[list[VariantConfig], dict[str, Runs]]:
    """The variants to launch, and per variant of ``variants`` its runs (empty for K = 1)."""
    check(k)
    if k == 1:
        return list(variants), {}
    out, groups = [], {}
    for v in variants:
        first = resolved_sections(cfg, v)[1].seed
        groups[v.name] = {run_name(v.name, i): first + i - 1 for i in range(1, k + 1)}
        out += [v.model_copy(update={"name": name, "train": {**v.train, "seed": seed}})
                for name, seed in groups[v.name].items()]
    taken = {v.name for v in variants} & {v.name for v in out}
    if taken:
        raise UsageError(f"{source}: --seeds {k} names the runs of each variant <variant>-s1 .. -s{k}, but a "
                         f"variant is already named {sorted(taken)[0]}; rename it")
    return out, groups
