"""``bench --workers 1,2``: the training benchmark at several worker counts, through the real
``train`` path (preflight, plan, TorchTrainer, the worker loop), so the scaling measured is
the scaling users get.

Per count: tokens/s over all workers (steady-state median step), MFU over all their GPUs,
the peak memory of one GPU (rank 0's), the strategy the plan chose, and the scaling ratio
against the smallest count with its efficiency (ratio / worker ratio; 1.0 is linear).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from trainer import timing
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
    """Each row's tokens/s over the smallest count's, and that over the worker ratio."""
    ok = [r for r in rows if r.get("tokens_per_s")]
    if not ok:
        return rows
    base = min(ok, key=lambda r: r["workers"])
    for r in ok:
        r["scaling"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["efficiency"] = r["scaling"] / (r["workers"] / base["workers"])
    return rows


def run(cfg, counts: list[int], *, variant: str, steps: int, output_dir: str) -> list[dict]:
    """Train ``steps`` steps of ``variant`` at each worker count; one row per count."""
    rows = []
    with ray_session(None):  # one Ray for every count: train() reuses it
        for n in counts:
            rows.append(_one(cfg, n, variant=variant, steps=steps, output_dir=output_dir))
    return add_scaling(rows)


def _one(cfg, n: int, *, variant: str, steps: int, output_dir: str) -> dict:
    data = cfg.model_dump(mode="json")
    data["train"]["max_steps"] = steps
    data["train"]["checkpoint_every"] = max(steps, data["train"]["checkpoint_every"])
    data["scaling"]["num_workers"] = n
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
    log.info("workers %d: %s", n, f"{r['tokens_per_s']:,.0f} tok/s" if r.get("tokens_per_s") else r["status"])
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
    return lines
