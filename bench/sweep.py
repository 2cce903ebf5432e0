"""``bench --sweep``: candidates for a faster training step, measured in one run.

A baseline row (the config as it is) comes first, then one row per ``--sweep`` (a set of
config overrides, e.g. ``train.micro_batch_size=8,train.loss_impl=chunked``), each trained
through the same ``bench_variant`` (``trainer.step.Stepper``) with the same data and seed:
tokens/s, MFU, peak memory, and the change in tokens/s against the baseline.
"""

from __future__ import annotations

import logging

import yaml

from orchestrator import config as config_mod
from orchestrator.errors import UsageError

log = logging.getLogger(__name__)

SECTIONS = ("model", "train")


def parse(text: str) -> dict[str, dict]:
    """``'train.a=1,model.b=x'`` -> ``{'train': {'a': 1}, 'model': {'b': 'x'}}`` (values read as YAML)."""
    out: dict[str, dict] = {}
    for item in (x.strip() for x in text.split(",")):
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name or section not in SECTIONS:
            raise UsageError(f"--sweep {text!r}: expected comma-separated SECTION.KEY=VALUE with SECTION one of "
                             f"{', '.join(SECTIONS)} (e.g. train.micro_batch_size=8), got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"--sweep {text!r}: {key.strip()}: unreadable value {value!r}") from None
        if name in out.get(section, {}):
            raise UsageError(f"--sweep {text!r}: {key.strip()} given twice")
        out.setdefault(section, {})[name] = parsed
    return out


def configs(base: config_mod.RunConfig, sweeps: list[str]) -> list[tuple[str, config_mod.RunConfig]]:
    """(label, config) for the baseline and each sweep, every one validated (a bad key or value
    is a UsageError naming it, before anything trains)."""
    out = [("baseline", base)]
    for text in sweeps:
        out.append((text, config_mod.with_overrides(base, f"--sweep {text!r}", **parse(text))))
    return out


def with_deltas(rows: list[dict]) -> list[dict]:
    """Each row with ``delta_pct``: its tokens/s against the first (baseline) row's, in percent
    (None where either did not run)."""
    base = rows[0].get("tokens_per_s") if rows and rows[0].get("status") == "ok" else None
    return [dict(r, delta_pct=100 * (r["tokens_per_s"] / base - 1) if base and r.get("status") == "ok" else None)
            for r in rows]


def run(base: config_mod.RunConfig, sweeps: list[str], *, variant: str, tokens, vocab_size: int, device,
        warmup: int, iters: int, on_row=None) -> list[dict]:
    """Train the baseline and every sweep (``variant``'s attention); rows in that order."""
    from bench import training

    rows = []
    for label, cfg in configs(base, sweeps):
        row = training.bench_variant(variant, model_cfg=cfg.model, train_cfg=cfg.train, tokens=tokens,
                                     vocab_size=vocab_size, device=device, warmup=warmup, iters=iters)
        rows = with_deltas(rows + [{"candidate": label, **row}])
        r = rows[-1]
        log.info("sweep %-40s %s", label,
                 f"{r['tokens_per_s']:.0f} tok/s" + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else "") +
                 (f", {r['delta_pct']:+.1f}% vs baseline" if r.get("delta_pct") is not None else "")
                 if r["status"] == "ok" else f"{r['status']} {r.get('error', '')}")
        if on_row:
            on_row(rows)
    return rows


def markdown(rows: list[dict]) -> list[str]:
    out = ["| candidate | kernel | loss | micro-batch | status | tokens/s | step s | MFU % | peak GiB | vs baseline |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        cells = [f"`{r['candidate']}`", r.get("kernel") or "", r.get("loss_impl") or "", str(r.get("micro_batch", "")),
                 r["status"] if ok else f"{r['status']}: {r.get('error', '')}",
                 f"{r['tokens_per_s']:,.0f}" if ok else "", f"{r['step_time_s']:.4f}" if ok else "",
                 f"{100 * r['mfu']:.1f}" if ok and r.get("mfu") else "",
                 f"{r['peak_mem_bytes'] / 2**30:.1f}" if ok and r.get("peak_mem_bytes") else "",
                 f"{r['delta_pct']:+.1f}%" if r.get("delta_pct") is not None else ""]
        out.append("| " + " | ".join(cells) + " |")
    return out
