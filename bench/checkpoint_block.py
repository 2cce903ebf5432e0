"""Checkpoint blocking time, synchronous against asynchronous: one config trained twice by
``orchestrator train``, with ``train.checkpoint_async`` false and then true.

Reported per checkpoint: the seconds training stood still for it (``checkpoint_block_s`` in the
run's summary, measured in the worker from the save's start to training going on), and the
ratio of the medians. Between two checkpoints training must outlast the background write, or
the next save waits for it and counts that wait (a ``train.checkpoint_every`` too small shows
as async times near the sync ones). Runs on CPU or GPU, wherever the project is installed:

    python3 -m bench.checkpoint_block --config-file configs/llama-0.95b.yaml \\
        --set train.max_steps=60 --set train.checkpoint_every=20

Results: docs/faults-and-resume.md ("Asynchronous checkpoints").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path


def measure(config_file: str | None, settings: list[str], output_dir: Path) -> dict:
    """Each mode's blocking seconds per checkpoint step, and the ratio of the medians."""
    from orchestrator.options import TrainOptions
    from orchestrator.run import train

    runs = {}
    for mode in ("sync", "async"):
        summary = train(TrainOptions(config_file=config_file, output_dir=str(output_dir), name=f"checkpoint-{mode}",
                                     settings=[*settings, f"train.checkpoint_async={str(mode == 'async').lower()}"]))
        variant = next(iter(summary.variants.values()))
        if variant.status != "succeeded":
            raise SystemExit(f"the {mode} run {variant.status}: {variant.error}")
        runs[mode] = {c["step"]: c["block_s"] for c in variant.checkpoint_block_s}
    medians = {mode: round(statistics.median(blocks.values()), 4) for mode, blocks in runs.items()}
    return {"block_s": runs, "median_block_s": medians, "async_over_sync": round(medians["async"] / medians["sync"], 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.checkpoint_block", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=None, help="YAML config (default: the built-in small config)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config key, as train's --set (repeatable)")
    p.add_argument("--output-dir", type=Path, default=None, help="keep both runs here (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="checkpoint-block-") as tmp:
        result = measure(args.config_file, args.settings, args.output_dir or Path(tmp))
    steps = sorted(result["block_s"]["sync"])
    print("step   sync block_s   async block_s")
    for step in steps:
        print(f"{step:>4}   {result['block_s']['sync'][step]:>12.3f}   {result['block_s']['async'].get(step, float('nan')):>13.3f}")
    print(f"median {result['median_block_s']['sync']:>11.3f}   {result['median_block_s']['async']:>13.3f}"
          f"   (async / sync {result['async_over_sync']:.3f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
