"""``bench --float8-check``: float8 against bf16 on the same config, data and seed, N steps each.

Both runs go through the same ``bench_variant`` (``trainer.step.Stepper``) with the run's
warmup + cosine learning rate over the N steps, the same batches in the same order and the same
initial weights. Reported: tokens/s of each (median step after the warmup steps), their ratio,
and each run's loss as the mean of its last 10 steps.

The loss tolerance. Both runs see the same batches from the same weights, so their gap is the
numerics alone. The default allowance is 2% of the bf16 loss (``--loss-tolerance``): a stated
choice, not a measurement. To show what it is worth on this config, a third run repeats bf16
at seed + 1 (other initial weights and data order); its gap to bf16, the seed-to-seed spread,
is printed beside the verdict, so a reader sees whether float8 moved the loss more or less
than a change of seed does. The mean of the last 10 steps keeps one step from deciding.

The data must not repeat. A model that reads its corpus several times over memorises it, and
then the loss measures how fast each run memorises, not float8's numerics (seen on two H200s
on 2026-11-28: the embedded corpus read 25 times in 200 steps, bf16 at 0.73 nats). When the
steps would read the data more than once, the verdict is ``inconclusive``, with the size of
corpus the check needs (``data.path``; ``python3 -m bench.corpus`` builds one from local text).
"""

from __future__ import annotations

import logging
import statistics
from typing import Optional

log = logging.getLogger(__name__)

LAST = 10  # the loss of a run: the mean of its last LAST steps
TOLERANCE = 0.02  # |float8 - bf16| / bf16, see the module docstring
SPEEDUP_GOAL = 1.15  # issue #15: float8 >= +15% tokens/s


def final_loss(row: dict, last: int = LAST) -> Optional[float]:
    """The mean of a finished row's last ``last`` losses (None when it did not run)."""
    losses = row.get("losses") or []
    if row.get("status") != "ok" or not losses:
        return None
    return statistics.fmean(losses[-last:])


def data_passes(n_tokens: int, steps: int, tokens_per_step: int) -> float:
    """How many times ``steps`` steps read a corpus of ``n_tokens`` tokens."""
    return steps * tokens_per_step / max(1, n_tokens)


def compare(bf16: dict, fp8: dict, *, tolerance: float = TOLERANCE, spread: Optional[dict] = None,
            last: int = LAST, passes: Optional[float] = None) -> dict:
    """The verdict of float8 against bf16 from their bench rows (pure: rows in, facts out).

    ``loss_ok`` is |loss_float8 - loss_bf16| / loss_bf16 <= tolerance; ``speedup`` the tokens/s
    ratio against SPEEDUP_GOAL; ``spread`` (a bf16 row of another seed) gives ``seed_spread``.
    ``verdict`` is pass, fail, not measured (a run did not finish; ``reason`` says which), or
    inconclusive when the runs read their data more than once (``passes`` > 1)."""
    lb, lf = final_loss(bf16, last), final_loss(fp8, last)
    out = {"tolerance": tolerance, "last_steps": last, "bf16_loss": lb, "float8_loss": lf,
           "speedup_goal": SPEEDUP_GOAL, "data_passes": passes}
    ls = final_loss(spread, last) if spread else None
    out["seed_spread"] = abs(ls - lb) / lb if ls is not None and lb else None
    missing = [name for name, row, loss in (("bf16", bf16, lb), ("float8", fp8, lf)) if loss is None]
    if missing:
        why = "; ".join(f"{n}: {r.get('status')} {r.get('error') or ''}".strip()
                        for n, r in (("bf16", bf16), ("float8", fp8)) if n in missing)
        return {**out, "verdict": "not measured", "reason": why, "loss_rel_diff": None, "loss_ok": None,
                "speedup": None, "speedup_ok": None}
    if not (all(map(_finite, bf16["losses"])) and all(map(_finite, fp8["losses"]))):
        return {**out, "verdict": "fail", "reason": "a loss was not finite", "loss_rel_diff": None,
                "loss_ok": False, "speedup": None, "speedup_ok": None}
    rel = (lf - lb) / lb
    speedup = fp8["tokens_per_s"] / bf16["tokens_per_s"]
    loss_ok = abs(rel) <= tolerance
    verdict, reason = ("pass" if loss_ok else "fail"), None
    if passes is not None and passes > 1:
        verdict, reason = "inconclusive", (f"the runs read their data {passes:.1f} times over, so the loss measures "
                                           "memorisation as much as float8's numerics")
    return {**out, "loss_rel_diff": rel, "loss_ok": loss_ok, "speedup": speedup, "speedup_ok": speedup >= SPEEDUP_GOAL,
            "verdict": verdict, "reason": reason}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def run(cfg, *, variant: str, tokens, vocab_size: int, device, steps: int, warmup: int,
        tolerance: float = TOLERANCE, on_row=None) -> dict:
    """bf16, float8, and bf16 at seed + 1 (the spread), ``steps`` steps each."""
    from bench import training

    if steps <= warmup:
        raise ValueError(f"--steps ({steps}) must exceed --warmup ({warmup})")
    base = cfg.train.model_copy(update={"float8": False})
    runs = {"bf16": base, "float8": base.model_copy(update={"float8": True}),
            "bf16_seed_plus_1": base.model_copy(update={"seed": base.seed + 1})}
    rows: dict[str, dict] = {}
    for name, tc in runs.items():
        rows[name] = training.bench_variant(variant, model_cfg=cfg.model, train_cfg=tc, tokens=tokens,
                                            vocab_size=vocab_size, device=device, warmup=warmup,
                                            iters=steps - warmup, schedule=True, keep_losses=True)
        r = rows[name]
        log.info("float8 check %-16s %s", name,
                 f"{r['tokens_per_s']:.0f} tok/s, loss (last {LAST}) {final_loss(r):.4f}" if r["status"] == "ok"
                 else f"{r['status']} {r.get('error', '')}")
        if on_row:
            on_row(rows)
    per_step = base.tokens_per_step
    passes = data_passes(len(tokens), steps, per_step)
    result = compare(rows["bf16"], rows["float8"], tolerance=tolerance, spread=rows["bf16_seed_plus_1"],
                     passes=passes)
    return {"steps": steps, "runs": rows, "data_tokens": len(tokens), "tokens_per_step": per_step, **result}


def markdown(report: dict) -> list[str]:
    runs = report["runs"]
    out = ["| run | dtype | status | tokens/s | step s | peak GiB | loss, mean of last %d steps |" % report["last_steps"],
           "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        ok = r.get("status") == "ok"
        recipe = f" ({r['float8_recipe']})" if r.get("float8_recipe") else ""
        out.append(f"| {name}{recipe} | {r.get('dtype', '')} | {r['status'] if ok else r['status'] + ': ' + (r.get('error') or '')} | "
                   f"{format(r['tokens_per_s'], ',.0f') if ok else ''} | {format(r['step_time_s'], '.4f') if ok else ''} | "
                   f"{format(r['peak_mem_bytes'] / 2**30, '.1f') if ok and r.get('peak_mem_bytes') else ''} | "
                   f"{format(final_loss(r, report['last_steps']), '.4f') if ok else ''} |")
    out.append("")
    out.append(verdict_line(report))
    return out


def verdict_line(report: dict) -> str:
    if report["verdict"] == "not measured":
        return f"float8 check after {report['steps']} steps: not measured ({report['reason']})"
    spread = (f"; bf16 seed-to-seed spread {100 * report['seed_spread']:.2f}%"
              if report.get("seed_spread") is not None else "")
    if report["loss_rel_diff"] is None:
        return f"float8 check after {report['steps']} steps: {report['verdict'].upper()} ({report['reason']})"
    line = (f"float8 check after {report['steps']} steps: loss float8 {report['float8_loss']:.4f} vs bf16 "
            f"{report['bf16_loss']:.4f} ({100 * report['loss_rel_diff']:+.2f}%, tolerance "
            f"±{100 * report['tolerance']:.1f}%{spread}): {report['verdict'].upper()}; tokens/s float8/bf16 "
            f"{report['speedup']:.3f}x (goal {report['speedup_goal']:.2f}x: "
            f"{'met' if report['speedup_ok'] else 'not met'})")
    if report["verdict"] != "inconclusive":
        return line
    if not report.get("tokens_per_step"):
        return f"{line} ({report['reason']})"
    need = report["steps"] * report["tokens_per_step"]
    return (f"{line}. {report['reason'][0].upper()}{report['reason'][1:]}: give data.path a corpus of at least "
            f"{need:,} tokens (python3 -m bench.corpus DIR builds one from local files)")
