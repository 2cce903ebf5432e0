"""Which timing of the attention candidates ranks them as training does.

    python3 -m bench.kernel_timers CONFIG.yaml OUT.json [--depths 0,1,2,8] [--rounds 2]

For every kernel that passes its check on this device (and standard attention), this times:

- each timer of ``trainer.attention.timing.block_timer`` asked for: depth 0 is the attention block
  alone (the timer before 2026-11-28 16:00 UTC), depth N is N whole transformer blocks (norms,
  attention, MLP), each compiled as training compiles it;
- the whole training step, ``bench.training.bench_variant`` with that kernel
  forced, ``--rounds`` times round-robin (median tokens/s).

It prints one row per kernel and, per timer, the kernel it would choose, its end-to-end
tokens/s, and that over the best kernel's: the timer that chooses the end-to-end fastest is the
one to keep. Without CUDA it runs on the config's shapes on CPU (a test of this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench import training
from orchestrator import config as config_mod
from trainer import attention, strict_json
from trainer.attention import timing
from trainer.step import training_dtype


def checked_here(names: list[str], device: torch.device, dtype: torch.dtype, margs) -> dict[str, object]:
    """Each named kernel that passes its check here, as the picker gets it (``standard``: standard
    attention); one that does not is left out, with why."""
    fns = {}
    for name in names:
        if name == "standard":
            fns[name] = attention.standard_attention
            continue
        try:
            fns[name] = attention.checked_fn(name, device=device, dtype=dtype, head_dim=margs.head_dim,
                                             n_heads=margs.n_heads, n_kv_heads=margs.n_kv_heads)
        except Exception as e:  # not installed, or fails here: not a candidate
            print(f"kernel {name}: not a candidate ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    return fns


def choice(ms: dict[str, float]) -> str | None:
    return min(ms, key=ms.get) if ms else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.kernel_timers", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--depths", default="0,1,2", help="timers: 0 the attention block alone, N whole blocks")
    p.add_argument("--rounds", type=int, default=2, help="end-to-end runs of each kernel, round-robin")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--kernels", default=None, help="comma-separated (default: every one that passes here)")
    args = p.parse_args(argv)
    cfg = config_mod.load(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tc = cfg.train
    dtype = training_dtype(tc, device)
    vocab = cfg.model.vocab_size or 2048
    margs = cfg.model.args(vocab_size=vocab, max_seq_len=tc.seq_len, activation_checkpointing=tc.activation_checkpointing,
                           loss_impl=tc.loss_impl)
    shape = attention.AttentionShape.of_run(tc, margs)
    fns = checked_here(args.kernels.split(",") if args.kernels else [*attention.flash_candidates(device), "standard"],
                       device, dtype, margs)
    names = list(fns)
    depths = [int(d) for d in args.depths.split(",")]
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "config": str(args.config), "shape": shape.as_run(device.type), "kernels": names,
                    "timers": {}, "end_to_end": {}}

    def save():
        args.out.write_text(strict_json.dumps(report, indent=1))

    for depth in depths:
        timer_shape = dataclasses.replace(shape, ffn_hidden=0) if depth == 0 else shape
        timer = timing.block_timer(timer_shape, device, depth=depth or None)
        ms = {}
        for name in names:
            try:
                ms[name] = timer(name, fns[name])
            except Exception as e:
                print(f"timer depth {depth}, {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            print(f"timer depth {depth}: {name} {ms.get(name, float('nan')):.4g} ms", flush=True)
        report["timers"][str(depth)] = ms
        save()
    tokens = np.random.default_rng(0).integers(0, vocab, size=max(tc.seq_len * tc.micro_batch_size * 64, 1 << 20),
                                               dtype=np.int64).astype(np.uint16 if vocab < 65536 else np.uint32)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            row = training.bench_variant("standard" if name == "standard" else "flash", model_cfg=cfg.model,
                                         train_cfg=tc, tokens=tokens, vocab_size=vocab, device=device,
                                         warmup=args.warmup, iters=args.iters, kernel=name)
            if row["status"] == "ok":
                runs[name].append(row["tokens_per_s"])
            print(f"end to end round {r}: {name} {row.get('tokens_per_s', row.get('error'))}", flush=True)
            report["end_to_end"] = runs
            save()
    e2e = {n: statistics.median(v) for n, v in runs.items() if v}
    best = max(e2e, key=e2e.get) if e2e else None
    report["summary"] = {}
    print("\n| kernel | " + " | ".join(f"timer depth {d} (ms)" for d in depths) + " | end to end tok/s (runs) |")
    print("|---|" + "---|" * (len(depths) + 1))
    for n in names:
        cells = [f"{report['timers'][str(d)].get(n, float('nan')):.4g}" for d in depths]
        runs_text = ", ".join(f"{x:,.0f}" for x in runs[n])
        print(f"| {n} | " + " | ".join(cells) + f" | {e2e.get(n, float('nan')):,.0f} ({runs_text}) |")
    print()
    for d in depths:
        pick = choice(report["timers"][str(d)])
        ratio = e2e[pick] / e2e[best] if pick in e2e and best else None
        report["summary"][str(d)] = {"choice": pick, "choice_over_best": ratio}
        print(f"timer depth {d}: chooses {pick}; end to end {ratio if ratio is None else f'{ratio:.3f}'} of the best ({best})")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
