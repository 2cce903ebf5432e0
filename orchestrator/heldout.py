"""Which of two variants is better on held-out data, and how sure that is: the verdict of the
comparison report (orchestrator/comparison.py), a pure function of the variants' metrics records.
The method, paired by batch and over seeds: docs/validation.md, "The report's verdict".
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


def _seed_mean(runs: list[dict]) -> tuple[float, list[float]]:
    """The held-out loss and the per-batch losses of one variant's runs, averaged over its seeds."""
    return (statistics.fmean(r["val_loss"] for r in runs),
            [statistics.fmean(col) for col in zip(*(r["val_batch_losses"] for r in runs))])


def at_point(a: str, b: str, ra: list[dict], rb: list[dict], parity_rtol: Optional[float] = None) -> Verdict:
    """The verdict on one evaluation of each run of the two variants (``ra``, ``rb``: a metrics
    record per seed, all at one step)."""
    where = f"step {ra[0]['step']}" if ra[0]["step"] == rb[0]["step"] else f"steps {ra[0]['step']} and {rb[0]['step']}"
    where += f" ({ra[0]['tokens']:,} tokens)" if ra[0].get("tokens") == rb[0].get("tokens") else ""
    step, tokens = ra[0]["step"], ra[0].get("tokens")
    if len({(len(r["val_batch_losses"]), r.get("val_tokens")) for r in ra + rb}) > 1:
        return Verdict(a, b, "not compared", f"{a} and {b} evaluated different held-out batches (their seq_len or "
                       f"micro_batch_size differ): not compared", step, tokens)
    (mean_a, va), (mean_b, vb) = _seed_mean(ra), _seed_mean(rb)
    diff = mean_a - mean_b
    _, se = paired_difference(va, vb)
    n = len(va)
    over = f"± one standard error over {n} paired batches"
    if len(ra) > 1 or len(rb) > 1:
        if min(len(ra), len(rb)) < 2:
            one = a if len(ra) < 2 else b
            return Verdict(a, b, "not compared", f"{a} - {b}: {diff:+.4f} held-out loss at {where}, but only one run "
                           f"of {one} got there: no spread over seeds to compare with", step, tokens, diff)
        seeds = f"{len(ra)} seeds each" if len(ra) == len(rb) else f"{len(ra)} and {len(rb)} seeds"
        se = (statistics.variance(r["val_loss"] for r in ra) / len(ra)
              + statistics.variance(r["val_loss"] for r in rb) / len(rb) + (se or 0.0) ** 2) ** 0.5
        over = f"means over {seeds}, ± one standard error from the spread over seeds and {n} paired batches"
    parity = None
    if parity_rtol is not None:
        rel = abs(diff) / max(abs(mean_b), 1e-12)
        parity = (f"held-out parity OK: relative difference {rel:.2e} within {parity_rtol:g}" if rel <= parity_rtol
                  else f"held-out parity FAILED: relative difference {rel:.2e} exceeds {parity_rtol:g}")
    if se is None:
        return Verdict(a, b, "not compared", f"{a} - {b}: {diff:+.4f} held-out loss at {where}, from one "
                       "evaluation batch: no uncertainty (raise train.eval_batches or give more held-out data)",
                       step, tokens, diff, None, parity)
    if abs(diff) > Z * se:
        better, worse = (a, b) if diff < 0 else (b, a)
        text = f"{better} is better than {worse} by {abs(diff):.4f} ± {se:.4f} held-out loss at {where} ({over})"
        outcome = "better"
    else:
        text = (f"no difference within noise between {a} and {b} at {where}: {diff:+.4f} ± {se:.4f} held-out loss "
                f"({a} - {b}, {over})")
        outcome = "no difference"
    return Verdict(a, b, outcome, text, step, tokens, diff, se, parity)


def _points(runs: list[list[dict]], key: str) -> dict:
    """{value of ``key``: each run's evaluation there} for the values every run evaluated at, in order."""
    evals = [{r[key]: r for r in _evaluations(records) if r.get(key) is not None} for records in runs]
    if not evals:
        return {}
    return {k: [e[k] for e in evals] for k in evals[0] if all(k in e for e in evals[1:])}


def compare(a: str, b: str, a_runs: list[list[dict]], b_runs: list[list[dict]],
            parity_rtol: Optional[float] = None) -> list[Verdict]:
    """Verdicts at the last step every run of both variants evaluated, and at the last equal token
    count when that is another point (variants of different tokens per step). ``a_runs``,
    ``b_runs``: each seed's metrics records (one run without --seeds). ``parity_rtol``: the same
    model (flash vs standard), whose held-out losses must agree within this relative tolerance."""
    sa, sb = _points(a_runs, "step"), _points(b_runs, "step")
    steps = [s for s in sa if s in sb]
    if not steps:
        return [Verdict(a, b, "not compared", f"{a} and {b} share no evaluated step: no held-out comparison")]
    step = steps[-1]
    out = [at_point(a, b, sa[step], sb[step], parity_rtol)]
    ta, tb = _points(a_runs, "tokens"), _points(b_runs, "tokens")
    tokens = [t for t in ta if t in tb]
    if tokens and (ta[tokens[-1]][0]["step"], tb[tokens[-1]][0]["step"]) != (step, step):  # equal tokens elsewhere
        out.append(at_point(a, b, ta[tokens[-1]], tb[tokens[-1]], parity_rtol))
    return out
