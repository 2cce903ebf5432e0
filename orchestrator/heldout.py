"""Which of two variants is better on held-out data, and how sure that is: the verdict of the
comparison report (orchestrator/comparison.py), a pure function of the variants' metrics records.

Every variant evaluates the same held-out batches (trainer/evaluate.py), so the comparison is
paired by batch: the per-batch differences of the two variants' losses give the standard error
of the difference, free of how hard each batch is. A difference larger than ``Z`` standard
errors is called; anything smaller is "no difference within noise". The uncertainty covers the
choice of held-out batches only, not the training seed: two seeds of one model can differ by
more.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Optional

# Two standard errors: about a 95% interval for a difference of means.
Z = 2.0


@dataclass
class Verdict:
    a: str
    b: str
    outcome: str  # better | no difference | not compared
    text: str  # the sentence the report prints
    step: Optional[int] = None
    tokens: Optional[int] = None
    diff: Optional[float] = None  # val_loss of a minus val_loss of b: negative means a is better
    stderr: Optional[float] = None
    parity: Optional[str] = None  # same model: whether the held-out losses agree within the tolerance


def _evaluations(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("val_batch_losses")]


def paired_difference(a: list[float], b: list[float]) -> tuple[float, Optional[float]]:
    """The mean of the per-batch differences a - b and its standard error (None for one batch)."""
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), (statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None)


def at_point(a: str, b: str, ra: dict, rb: dict, parity_rtol: Optional[float] = None) -> Verdict:
    """The verdict on one evaluation of each variant (``ra``, ``rb``: metrics records)."""
    where = f"step {ra['step']}" if ra["step"] == rb["step"] else f"steps {ra['step']} and {rb['step']}"
    where += f" ({ra['tokens']:,} tokens)" if ra.get("tokens") == rb.get("tokens") else ""
    va, vb = ra["val_batch_losses"], rb["val_batch_losses"]
    if len(va) != len(vb) or ra.get("val_tokens") != rb.get("val_tokens"):
        return Verdict(a, b, "not compared", f"{a} and {b} evaluated different held-out batches (their seq_len or "
                       f"micro_batch_size differ): not compared", ra["step"], ra.get("tokens"))
    diff = ra["val_loss"] - rb["val_loss"]
    _, se = paired_difference(va, vb)
    parity = None
    if parity_rtol is not None:
        rel = abs(diff) / max(abs(rb["val_loss"]), 1e-12)
        parity = (f"held-out parity OK: relative difference {rel:.2e} within {parity_rtol:g}" if rel <= parity_rtol
                  else f"held-out parity FAILED: relative difference {rel:.2e} exceeds {parity_rtol:g}")
    if se is None:
        return Verdict(a, b, "not compared", f"{a} - {b}: {diff:+.4f} held-out loss at {where}, from one "
                       "evaluation batch: no uncertainty (raise train.eval_batches or give more held-out data)",
                       ra["step"], ra.get("tokens"), diff, None, parity)
    if abs(diff) > Z * se:
        better, worse = (a, b) if diff < 0 else (b, a)
        text = (f"{better} is better than {worse} by {abs(diff):.4f} ± {se:.4f} held-out loss at {where} "
                f"(± one standard error over {len(va)} paired batches)")
        outcome = "better"
    else:
        text = (f"no difference within noise between {a} and {b} at {where}: {diff:+.4f} ± {se:.4f} held-out loss "
                f"({a} - {b}, ± one standard error over {len(va)} paired batches)")
        outcome = "no difference"
    return Verdict(a, b, outcome, text, ra["step"], ra.get("tokens"), diff, se, parity)


def compare(a: str, b: str, a_records: list[dict], b_records: list[dict],
            parity_rtol: Optional[float] = None) -> list[Verdict]:
    """Verdicts at the last step both variants evaluated, and at the last equal token count when
    that is another point (variants of different tokens per step). ``parity_rtol``: the same model
    (flash vs standard), whose held-out losses must agree within this relative tolerance."""
    ea, eb = _evaluations(a_records), _evaluations(b_records)
    by_step = {r["step"]: r for r in eb}
    steps = [r for r in ea if r["step"] in by_step]
    if not steps:
        return [Verdict(a, b, "not compared", f"{a} and {b} share no evaluated step: no held-out comparison")]
    ra = steps[-1]
    out = [at_point(a, b, ra, by_step[ra["step"]], parity_rtol)]
    by_tokens = {r.get("tokens"): r for r in eb}
    tokens = [r for r in ea if r.get("tokens") is not None and r["tokens"] in by_tokens]
    if tokens:
        ta, tb = tokens[-1], by_tokens[tokens[-1]["tokens"]]
        if (ta["step"], tb["step"]) != (ra["step"], ra["step"]):  # equal tokens at other steps
            out.append(at_point(a, b, ta, tb, parity_rtol))
    return out
