"""Our run beside torchtitan's: the ratio of steady tokens/s, measured the same way.

    python3 -m bench.torchtitan.compare --ours RUN_DIR --titan DIR/titan.json [--out compare.json]

Ours is ``RUN_DIR/summary.json``'s variant (``tokens_per_s``: all workers; the median step after
the first tenth of the steps, from step times between logged steps); torchtitan's is run.py's
``titan.json``, whose steady figure comes from its metrics lines by that same rule (parse.py).
Both are totals over the GPUs of the run (per GPU too), both sides must have used the same
number of GPUs, and the MFU of both is ours: the variant's ``flops_per_token`` at the device's
dense bf16 peak (``trainer.timing``). Exit code 0 when both ran and the ratio was computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer import strict_json, timing

GIB = 2**30


def our_variant(summary: dict, name: str | None) -> tuple[str, dict]:
    variants = summary.get("variants") or {}
    if name is None:
        if len(variants) != 1:
            raise ValueError(f"the run has variants {sorted(variants)}: pick one with --variant")
        name = next(iter(variants))
    if name not in variants:
        raise ValueError(f"no variant {name!r} in the run (it has {sorted(variants)})")
    return name, variants[name]


def compare(summary: dict, titan: dict, variant: str | None = None) -> dict:
    name, ours = our_variant(summary, variant)
    gpus = ours.get("num_workers")
    row_ours = {
        "stack": f"flash-orchestrator ({name})", "status": ours.get("status"), "gpus": gpus,
        "tokens_per_s": ours.get("tokens_per_s"),
        "tokens_per_s_per_gpu": ours.get("tokens_per_s_per_gpu")
        or (ours["tokens_per_s"] / gpus if ours.get("tokens_per_s") and gpus else None),
        "step_time_s": ours.get("step_time_s"), "mfu": ours.get("mfu"),
        "peak_memory_gib": (ours["peak_mem_bytes"] / GIB) if ours.get("peak_mem_bytes") else None,
        "peak_memory_kind": ours.get("peak_mem_kind"), "steps": ours.get("steps"),
        "attention_kernel": ours.get("backend"), "error": ours.get("error")}
    peak = timing.peak_tflops_of(titan.get("device") or "")
    flops = ours.get("flops_per_token")
    row_titan = {
        "stack": f"torchtitan {titan.get('versions', {}).get('torchtitan', '?')}", "status": titan.get("status"),
        "gpus": titan.get("gpus"), "tokens_per_s": titan.get("tokens_per_s"),
        "tokens_per_s_per_gpu": titan.get("tokens_per_s_per_gpu"), "step_time_s": titan.get("step_time_s"),
        "mfu": timing.mfu(flops, titan["tokens_per_s_per_gpu"], peak)
        if flops and titan.get("tokens_per_s_per_gpu") else None,
        "peak_memory_gib": titan.get("peak_memory_reserved_gib"), "peak_memory_kind": "cuda_max_reserved",
        "steps": titan.get("steps"), "attention_kernel": "sdpa (torchtitan's choice)", "error": titan.get("error")}
    problems = []
    if row_ours["status"] != "succeeded" or not row_ours["tokens_per_s"]:
        problems.append(f"ours did not report a steady tokens/s ({row_ours['status']}: {row_ours['error']})")
    if row_titan["status"] != "succeeded" or not row_titan["tokens_per_s"]:
        problems.append(f"torchtitan did not report a steady tokens/s ({row_titan['status']}: {row_titan['error']})")
    if gpus != titan.get("gpus"):
        problems.append(f"different GPU counts: ours {gpus}, torchtitan {titan.get('gpus')}")
    ratio = row_ours["tokens_per_s"] / row_titan["tokens_per_s"] if not problems else None
    return {"ratio": ratio, "goal": 1.0, "met": ratio >= 1.0 if ratio is not None else None,
            "problems": problems, "rows": [row_ours, row_titan], "device": titan.get("device")}


def table(result: dict) -> str:
    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = ["| stack | GPUs | tokens/s | per GPU | median step (s) | MFU | peak memory/GPU (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['stack']} | {r['gpus']} | {f(r['tokens_per_s'], ',.0f')} | "
                     f"{f(r['tokens_per_s_per_gpu'], ',.0f')} | {f(r['step_time_s'], '.3f')} | "
                     f"{f(r['mfu'] * 100 if r['mfu'] else None, '.1f')}{'%' if r['mfu'] else ''} | "
                     f"{f(r['peak_memory_gib'], '.1f')} ({r['peak_memory_kind']}) |")
    ratio = result["ratio"]
    lines.append(f"\nours / torchtitan: {ratio:.3f}x (goal >= 1.0x: {'met' if result['met'] else 'NOT met'})"
                 if ratio is not None else "\nno ratio: " + "; ".join(result["problems"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.torchtitan.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", type=Path, required=True, help="our run directory (with summary.json)")
    p.add_argument("--titan", type=Path, required=True, help="run.py's titan.json")
    p.add_argument("--variant", default=None, help="our variant, when the run has several")
    p.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    a = p.parse_args(argv)
    try:
        result = compare(json.loads((a.ours / "summary.json").read_text()), json.loads(a.titan.read_text()),
                         a.variant)
    except (OSError, ValueError, KeyError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    if a.out:
        a.out.write_text(strict_json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0 if result["ratio"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
