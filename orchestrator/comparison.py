"""The comparison report: ``report.md`` and PNG charts in the run directory, from the files a
run leaves there (summary.json, plan.json, config.yaml, <variant>/metrics.jsonl).

``train`` writes it at the end of a run; ``python -m orchestrator report RUN_DIR`` rewrites it.

Loss parity: variants with the same config and seed start from the same weights and see the
same batches (both are pure functions of the seed), so flash and standard must give the
same losses up to the kernels' rounding. Over the first ``PARITY_STEPS`` logged steps the
relative difference must stay within ``PARITY_RTOL`` for the dtype the workers trained in:
fp32 kernels agree to ~1e-6, and 1e-3 leaves room for the optimizer to amplify that over a
few steps; bf16 rounds each attention output to 8 bits of mantissa, hence 2e-2.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from orchestrator import heldout, plots
from orchestrator.errors import UsageError
from orchestrator.results import (CONFIG_FILE, LOSS_PNG, MEMORY_PNG, PLAN_FILE, REPORT_FILE, THROUGHPUT_PNG, VAL_LOSS_PNG,
                                  RunSummary, SeedGroup, VariantResult, fmt, mib, read_summary, spread)
from trainer.metrics import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)

PARITY_STEPS = 10
PARITY_RTOL = {"float32": 1e-3, "bfloat16": 2e-2}
# Two runs of the same kernel (flash attention disabled for both) differ only by the order
# of floating-point reductions, if at all: far tighter.
SAME_KERNEL_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}


@dataclass
class Parity:
    flash: str
    standard: str
    status: str  # agree | diverged | not checked
    detail: str
    rows: list[tuple[int, float, float, float]]  # step, flash loss, standard loss, relative difference


def check_parity(flash: str, standard: str, a: list[dict], b: list[dict], dtype: Optional[str],
                 not_comparable: Optional[str] = None, same_kernel: bool = False) -> Parity:
    """Compare the first PARITY_STEPS logged losses of two variants. ``not_comparable`` is the
    reason they cannot be compared (different config), if any; ``same_kernel`` asks for the
    tight tolerance of two runs of one attention kernel."""
    if not_comparable:
        return Parity(flash, standard, "not checked", not_comparable, [])
    table = SAME_KERNEL_RTOL if same_kernel else PARITY_RTOL
    rtol = table.get(dtype or "float32", table["bfloat16"])
    by_step = {r["step"]: r["loss"] for r in b}
    rows = [(r["step"], r["loss"], by_step[r["step"]], abs(r["loss"] - by_step[r["step"]]) / max(abs(by_step[r["step"]]), 1e-12))
            for r in a if r["step"] <= PARITY_STEPS and r["step"] in by_step]
    if not rows:
        return Parity(flash, standard, "not checked", f"no common logged step among the first {PARITY_STEPS}", [])
    worst = max(rows, key=lambda row: row[3])
    bad = [row for row in rows if row[3] > rtol]
    span = f"steps {rows[0][0]}-{rows[-1][0]}"
    if bad:
        return Parity(flash, standard, "diverged",
                      f"DIVERGED: relative difference {bad[0][3]:.2e} at step {bad[0][0]} exceeds {rtol:g} "
                      f"({dtype}); worst {worst[3]:.2e} at step {worst[0]} over {span}", rows)
    return Parity(flash, standard, "agree",
                  f"max relative difference {worst[3]:.2e} (step {worst[0]}) over {span}, "
                  f"within {rtol:g} ({dtype})", rows)


def timed_fastest(r: VariantResult) -> bool:
    """A flash variant that ran standard attention because it timed fastest, not as a fallback."""
    timings = r.kernel_timings or {}
    return r.backend == "standard" and "standard" in timings and min(timings, key=timings.get) == "standard"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------- reading the run directory


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _overrides(config: Optional[dict], name: str) -> dict:
    for v in (config or {}).get("variants") or []:
        if v.get("name") == name:
            return {"model": v.get("model") or {}, "train": v.get("train") or {}}
    return {"model": {}, "train": {}}


def _not_comparable(config: Optional[dict], a: str, b: str, ra: VariantResult, rb: VariantResult) -> Optional[str]:
    """Why two variants' losses are not expected to match, or None."""
    if _overrides(config, a) != _overrides(config, b):
        return f"{a} and {b} override different model/train settings"
    for key in ("num_workers", "dtype", "param_dtype", "tokens_per_step", "params"):
        if getattr(ra, key) != getattr(rb, key):
            return f"{a} and {b} differ in {key} ({getattr(ra, key)} vs {getattr(rb, key)})"
    return None


def _pairs(variants: dict[str, VariantResult], flash_disabled: bool = False) -> list[tuple[str, str]]:
    """(flash, standard) pairs to compare: every succeeded flash variant against the first
    succeeded standard one. With flash attention disabled for the run every variant ran
    standard attention: the first is compared with each of the others."""
    ok = {n: r for n, r in variants.items() if r.status == "succeeded"}
    if flash_disabled:
        names = list(ok)
        return [(names[0], n) for n in names[1:]]
    standard = next((n for n, r in ok.items() if r.attention == "standard"), None)
    if standard is None:
        return []
    return [(n, standard) for n, r in ok.items() if r.attention == "flash"]


# ---------------------------------------------------------------- rendering


def _fmt(x, spec: str = ",.0f", unit: str = "") -> str:
    return fmt(x, spec, "–", unit)


def _workers(r: VariantResult) -> str:
    if r.status == "skipped":
        return "–"
    kind = "GPU" if r.use_gpu else "CPU"
    nodes = sorted({w.get("node_id", "")[:12] for w in r.workers})
    where = f" on {', '.join(nodes)}" if nodes else ""
    return f"{r.num_workers} x {kind}{where}"


def _variant_table(variants: dict[str, VariantResult]) -> list[str]:
    names = list(variants)
    rows = [
        ("status", lambda r: r.status),
        ("attention requested", lambda r: r.attention),
        ("kernel that ran", lambda r: f"`{r.backend}`" if r.backend else "–"),
        ("env", lambda r: " ".join(f"`{k}={v}`" for k, v in r.env.items()) or "–"),
        ("workers", _workers),
        ("dtype", lambda r: r.dtype or "–"),
        ("weights", lambda r: {"bf16": "bf16, fp32 masters", "fp32": "fp32"}.get(r.param_dtype or "", "–")),
        ("steps", lambda r: str(r.steps)),
        ("tokens/s (steady)", lambda r: _fmt(r.tokens_per_s)),
        ("step time (median)", lambda r: _fmt(r.step_time_s and r.step_time_s * 1000, ",.1f", " ms")),
        ("peak memory (rank 0)", lambda r: mib(r.peak_mem_bytes, "–")),
        ("first loss", lambda r: _fmt(r.first_loss, ".4f")),
        ("final loss", lambda r: _fmt(r.final_loss, ".4f")),
        ("held-out loss (final)", lambda r: _fmt(r.final_val_loss, ".4f")),
        ("held-out loss (best, step)", lambda r: f"{_fmt(r.best_val_loss, '.4f')} ({_fmt(r.best_val_step, 'd')})"),
        ("evaluation time", lambda r: _fmt(r.eval_s, ",.1f", " s")),
        ("restarts", lambda r: str(r.restarts)),
        ("wall time", lambda r: _fmt(r.wall_time_s, ",.1f", " s")),
    ]
    out = ["| | " + " | ".join(f"**{n}**" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, get in rows:
        out.append(f"| {label} | " + " | ".join(get(variants[n]) for n in names) + " |")
    if any(r.error or r.reason for r in variants.values()):
        why = [(variants[n].error or variants[n].reason or "").replace("|", "\\|") for n in names]
        out.append("| error / why skipped | " + " | ".join(why) + " |")
    return out


def _ratio_table(variants: dict[str, VariantResult], pairs: list[tuple[str, str]]) -> list[str]:
    out = ["| metric | " + " | ".join(f"{f} / {s}" for f, s in pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
    metrics = [("tokens/s", "tokens_per_s", "higher is faster"), ("step time", "step_time_s", "lower is faster"),
               ("peak memory", "peak_mem_bytes", "lower uses less"), ("final loss", "final_loss", "≈ 1 expected")]
    for label, key, hint in metrics:
        cells = [_fmt(ratio(getattr(variants[f], key), getattr(variants[s], key)), ".3f", "x") for f, s in pairs]
        out.append(f"| {label} ({hint}) | " + " | ".join(cells) + " |")
    return out


def groups_of(summary: RunSummary) -> dict[str, list[str]]:
    """Each variant of the config and its runs: K of them under --seeds K, else the variant alone."""
    return {g: sg.variants for g, sg in (summary.seed_groups or {}).items()} or {n: [n] for n in summary.variants}


def run_pairs(variants: dict[str, VariantResult], groups: dict[str, list[str]], flash_disabled: bool = False,
              ) -> list[tuple[str, str, str, str]]:
    """(flash run, standard run, flash variant, standard variant): ``_pairs`` of the variants,
    each pair compared run by run of the same seed (the same initial weights and batches)."""
    out = []
    for i in range(max(map(len, groups.values()), default=0)):
        view = {g: variants[runs[i]] for g, runs in groups.items() if i < len(runs)}
        out += [(groups[f][i], groups[s][i], f, s) for f, s in _pairs(view, flash_disabled)]
    return out


def held_out_verdicts(variants: dict[str, VariantResult], series: dict[str, list[dict]], config: Optional[dict],
                      groups: dict[str, list[str]]) -> list[heldout.Verdict]:
    """The first variant with a succeeded run against each other one on held-out loss, over
    their succeeded runs (``groups``: each variant's runs); a pair of one model (flash vs
    standard, or one model twice) is also checked for parity within the loss-parity tolerance
    of its dtype."""
    ok = {g: [n for n in runs if variants[n].status == "succeeded"] for g, runs in groups.items()}
    ok = {g: runs for g, runs in ok.items() if runs}
    names = list(ok)
    out = []
    for other in names[1:]:
        a, b = variants[ok[names[0]][0]], variants[ok[other][0]]
        same_model = _not_comparable(config, names[0], other, a, b) is None
        table = SAME_KERNEL_RTOL if a.backend == b.backend else PARITY_RTOL
        rtol = table.get(a.dtype or "float32", table["bfloat16"]) if same_model else None
        out += heldout.compare(names[0], other, [series.get(n, []) for n in ok[names[0]]],
                               [series.get(n, []) for n in ok[other]], rtol)
    return out


def _seeds_table(seed_groups: dict[str, SeedGroup]) -> list[str]:
    out = ["", "Each variant trained with several seeds (`train --seeds K`): held-out loss as the mean ± the standard "
               "deviation over its succeeded runs (n − 1), at their last step.", "",
           "| variant | runs | seeds | final held-out loss | best held-out loss | step |", "|---|---|---|---|---|---|"]
    for name, g in seed_groups.items():
        out.append(f"| {name} | {g.succeeded} of {len(g.variants)} succeeded | {', '.join(map(str, g.seeds))} | "
                   f"{spread(g.final_val_loss_mean, g.final_val_loss_std, missing='–')} | "
                   f"{spread(g.best_val_loss_mean, g.best_val_loss_std, missing='–')} | {_fmt(g.step, 'd')} |")
    return out


def _held_out_section(verdicts: list[heldout.Verdict], seed_groups: Optional[dict[str, SeedGroup]] = None,
                      ) -> list[str]:
    lines = ["", "## Held-out loss", "",
             "Every variant evaluates the same held-out batches (docs/validation.md); the difference is paired by "
             f"batch, and called when it exceeds {heldout.Z:g} standard errors"
             + (" of the difference of the means over seeds, the seeds' spread included." if seed_groups else "."), ""]
    for v in verdicts:
        lines.append(f"- {v.text}" + (f"; {v.parity}" if v.parity else ""))
    if not verdicts:
        lines.append("- not compared: needs two succeeded variants that evaluated")
    return lines + (_seeds_table(seed_groups) if seed_groups else [])


def render(summary: RunSummary, plan: Optional[dict], parities: list[Parity], images: list[str], run_dir: Path,
           verdicts: list[heldout.Verdict] = ()) -> str:
    run, variants = summary.run, summary.variants
    pairs = [(p.flash, p.standard) for p in parities]
    lines = [f"# Run `{run.name}`: {' vs '.join(variants) or 'no variants'}", ""]
    lines += [f"- status: **{run.status}** (exit code {_fmt(run.exit_code, 'd')})",
              f"- variants ran: {run.mode or (plan or {}).get('mode', '?')}",
              f"- command: `{run.command or ''}`",
              f"- data: `{run.data or ''}`",
              f"- duration: {_fmt(run.duration_s, ',.1f', ' s')}"]
    for note in (plan or {}).get("notes", []):
        lines.append(f"- plan: {note}")
    lines += ["", "## Variants", ""] + _variant_table(variants)
    ran_standard = [n for n, r in variants.items() if r.attention == "flash" and r.backend == "standard"]
    timed = [n for n in ran_standard if timed_fastest(variants[n])]
    fell_back = [n for n in ran_standard if n not in timed]
    if timed:
        lines += ["", f"Note: {', '.join(timed)} asked for flash and ran standard attention: it timed fastest at "
                      "the run's shape (kernel_timings), so the flash variant took it."]
    if fell_back:
        lines += ["", f"Note: {', '.join(fell_back)} asked for flash but ran the standard kernel "
                      "(no fused kernel passed its check on the workers)."]
    disabled = (plan or {}).get("flash_disabled")
    lines += ["", "## Flash / standard", ""]
    if disabled:
        lines += [f"Flash attention was disabled for all {len(variants)} variants ({disabled}): every one trained "
                  "with standard attention, so no flash/standard speed ratio is claimed."]
    else:
        lines += _ratio_table(variants, pairs) if pairs else [
            "No ratios: they need a succeeded flash variant and a succeeded standard variant."]
    rtol = SAME_KERNEL_RTOL if disabled else PARITY_RTOL
    lines += ["", "## Loss parity", "",
              f"Same seed, same initial weights, same batches{', same attention' if disabled else ''}: the losses of "
              f"the first {PARITY_STEPS} steps must agree within a relative {rtol['float32']:g} in fp32 and "
              f"{rtol['bfloat16']:g} in bf16.", ""]
    for p in parities:
        flag = {"agree": "OK", "diverged": "**DIVERGED**", "not checked": "not checked"}[p.status]
        lines.append(f"- {p.flash} vs {p.standard}: {flag}: {p.detail}")
        if p.rows:
            lines += ["", f"  | step | {p.flash} | {p.standard} | relative difference |", "  |---|---|---|---|"]
            lines += [f"  | {s} | {a:.6f} | {b:.6f} | {d:.2e} |" for s, a, b, d in p.rows]
            lines.append("")
    if not parities:
        lines.append("- not checked: needs two succeeded variants" if disabled else
                     "- not checked: needs a succeeded flash variant and a succeeded standard variant")
    lines += _held_out_section(list(verdicts), summary.seed_groups)
    lines += ["", "## Charts", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    lines += ["", "## TensorBoard", "",
              "Every variant logs to `<run>/<variant>/tb`; one command overlays them:", "",
              "```bash", f"tensorboard --logdir {run.dir}", "```", ""]
    return "\n".join(lines)


@dataclass
class ComparisonReport:
    path: Path
    parities: list[Parity]
    verdicts: list[heldout.Verdict]

    def describe(self) -> list[str]:
        lines = [f"report: {self.path}"]
        lines += [f"  loss parity {p.flash} vs {p.standard}: {p.detail}" for p in self.parities]
        lines += [f"  held-out: {v.text}" + (f"; {v.parity}" if v.parity else "") for v in self.verdicts]
        return lines


def write(run_dir: Path) -> ComparisonReport:
    """Write report.md and the charts into ``run_dir``."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is None:
        raise UsageError(f"{run_dir}: no readable summary.json; is this a run directory?")
    plan = _read_json(run_dir / PLAN_FILE)
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        config = None
    variants = summary.variants
    series = {n: recs for n in variants if (recs := read_metrics(run_dir / n / METRICS_FILE))}
    parities = []
    disabled = bool((plan or {}).get("flash_disabled"))
    groups = groups_of(summary)
    for f, s, fg, sg in run_pairs(variants, groups, disabled):
        why = _not_comparable(config, fg, sg, variants[f], variants[s])
        parities.append(check_parity(f, s, series.get(f, []), series.get(s, []), variants[f].dtype, why,
                                     same_kernel=disabled))
        if parities[-1].status == "diverged":
            log.warning("loss parity: %s vs %s %s", f, s, parities[-1].detail)
    images = []
    if series:
        images.append(plots.loss(series, run_dir / LOSS_PNG).name)
        if any(r.get("val_loss") is not None for recs in series.values() for r in recs):
            images.append(plots.validation(series, run_dir / VAL_LOSS_PNG, groups).name)
        steady = {n: variants[n].tokens_per_s for n in series}
        images.append(plots.throughput(series, steady, run_dir / THROUGHPUT_PNG).name)
    peaks = {n: (r.peak_mem_bytes, r.peak_mem_kind or "peak") for n, r in variants.items() if r.peak_mem_bytes}
    if peaks:
        images.append(plots.memory(peaks, run_dir / MEMORY_PNG).name)
    verdicts = held_out_verdicts(variants, series, config, groups)
    path = run_dir / REPORT_FILE
    path.write_text(render(summary, plan, parities, images, run_dir, verdicts))
    return ComparisonReport(path, parities, verdicts)
