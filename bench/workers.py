"""``bench --workers 1,2 [--strategies ddp,fsdp]``: the training benchmark at several worker
counts, and optionally under several strategies, through the real ``train`` path (preflight,
plan, TorchTrainer, the worker loop), so the scaling measured is the scaling users get.

Per (strategy, count): tokens/s over all workers (steady-state median step), MFU over all their
GPUs, the peak memory of one GPU (rank 0's), the strategy that ran, and the scaling ratio
against the smallest count of the same strategy with its efficiency (ratio / worker ratio; 1.0
is linear). With fsdp and ddp both run: fsdp's tokens/s at each count of several workers over
the best ddp figure at that count (issue 12's goal: within 5%).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from trainer import parallel, timing
from orchestrator.options import TrainOptions
from orchestrator.run import train
from orchestrator.session import ray_session

log = logging.getLogger(__name__)


def _record(summary: dict) -> dict:
    return next(iter(summary["variants"].values()))


def row(workers: int, summary: dict) -> dict:
    """One worker count's figures, from its run's summary."""
    rec = _record(summary)
    out = {"workers": workers, "status": rec["status"], "variant": next(iter(summary["variants"])),
           "strategy": rec.get("strategy"), "backend": rec.get("backend"), "run_dir": summary["run"]["dir"]}
    if rec["status"] != "succeeded":
        return {**out, "error": rec.get("error")}
    tps = rec.get("tokens_per_s")
    device = ((rec.get("workers") or [{}])[0] or {}).get("device") or "cpu"
    peak = timing.peak_tflops_of(device) if rec.get("use_gpu") else None
    flops = rec.get("flops_per_token")
    return {**out, "device": device, "tokens_per_s": tps, "tokens_per_s_per_worker": tps / workers if tps else None,
            "step_time_s": rec.get("step_time_s"),
            "mfu": flops * tps / (workers * peak * 1e12) if (peak and tps and flops) else None,
            "peak_mem_bytes_per_gpu": rec.get("peak_mem_bytes") if rec.get("use_gpu") else None,
            "peak_mem_kind": rec.get("peak_mem_kind")}


def add_scaling(rows: list[dict]) -> list[dict]:
    """Each row's tokens/s over the smallest count's of its strategy, and that over the worker ratio."""
    ok = [r for r in rows if r.get("tokens_per_s")]
    for strategy in {r.get("strategy") for r in ok}:
        same = [r for r in ok if r.get("strategy") == strategy]
        base = min(same, key=lambda r: r["workers"])
        for r in same:
            r["scaling"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["efficiency"] = r["scaling"] / (r["workers"] / base["workers"])
    return rows


# Issue 12: FSDP2 counts as good as DDP when its tokens/s is within 5% of DDP's.
FSDP_GOAL = 0.95


def fsdp_vs_ddp(rows: list[dict]) -> list[dict]:
    """At each count of several workers that both ran: fsdp's tokens/s over the best ddp figure."""
    sharded, replicated = parallel.sharding(True), parallel.sharding(False)
    best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.get("tokens_per_s") and r.get("strategy") in parallel.NAMES and r["workers"] > 1:
            key = (r["strategy"], r["workers"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    return [{"workers": n, "fsdp_tokens_per_s": tps, "ddp_tokens_per_s": best[(replicated, n)],
             "ratio": tps / best[(replicated, n)], "goal": FSDP_GOAL, "met": tps / best[(replicated, n)] >= FSDP_GOAL}
            for (strategy, n), tps in sorted(best.items(), key=lambda kv: kv[0][1])
            if strategy == sharded and (replicated, n) in best]


def run(cfg, counts: list[int], *, variant: str, steps: int, output_dir: str,
        strategies: list[str] | None = None) -> list[dict]:
    """Train ``steps`` steps of ``variant`` at each worker count, under each of ``strategies``
    (None: the config's ``scaling.strategy``); one row per (strategy, count)."""
    rows = []
    with ray_session(None):  # one Ray for every run: train() reuses it
        for strategy in strategies or [None]:
            for n in counts:
                rows.append(_one(cfg, n, variant=variant, steps=steps, output_dir=output_dir, strategy=strategy))
    return add_scaling(rows)


def _one(cfg, n: int, *, variant: str, steps: int, output_dir: str, strategy: str | None = None) -> dict:
    data = cfg.model_dump(mode="json")
    data["train"]["max_steps"] = steps
    data["train"]["checkpoint_every"] = max(steps, data["train"]["checkpoint_every"])
    data["scaling"]["num_workers"] = n
    if strategy is not None:
        data["scaling"]["strategy"] = strategy
    data["attention"], data["variants"] = variant, None
    tmp = Path(output_dir) / f".bench-workers-{n}-{time.time_ns()}.yaml"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(yaml.safe_dump(data))
    try:
        summary = train(TrainOptions(config_file=str(tmp), output_dir=output_dir,
                                     disable_flash_attn=variant == "standard"))
    finally:
        tmp.unlink(missing_ok=True)
    r = row(n, summary.model_dump())  # the same fields as summary.json
    if r.get("strategy") is None:  # it never started: say what was asked for
        r["strategy"] = strategy
    log.info("%s x%d: %s", r.get("strategy") or "workers", n,
             f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else r["status"])
    return r


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| workers | strategy | tokens/s | per worker | MFU | peak GiB/GPU | scaling | efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt, scale=1.0):
            v = r.get(key)
            return format(v * scale, fmt) if v is not None else "n/a"
        lines.append(f"| {r['workers']} | {r.get('strategy') or 'n/a'} | {f('tokens_per_s', ',.0f')} | "
                     f"{f('tokens_per_s_per_worker', ',.0f')} | {f('mfu', '.1%')} | "
                     f"{f('peak_mem_bytes_per_gpu', '.1f', 2**-30)} | {f('scaling', '.2f')}x | {f('efficiency', '.1%')} |")
    for c in fsdp_vs_ddp(rows):
        lines += ["", f"fsdp / best ddp tokens/s at {c['workers']} workers: {c['fsdp_tokens_per_s']:,.0f} / "
                      f"{c['ddp_tokens_per_s']:,.0f} = {c['ratio']:.3f} (goal >= {c['goal']:.2f}: "
                      f"{'met' if c['met'] else 'not met'})"]
    return lines

