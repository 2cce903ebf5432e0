"""The comparison report's PNG charts: loss and held-out loss against step, throughput, peak memory.

matplotlib's object API (``Figure``, no pyplot): no global backend or figure state, so it is
safe from any thread and never needs a display.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from matplotlib.figure import Figure

# Series: variant name -> list of metrics records (dicts with step, loss, tokens_per_s, ...).
Series = dict[str, list[dict]]

_SIZE = (7.5, 4.2)
_DPI = 110
_DASHES = ("--", ":", "-.")
_MEMORY_KINDS = {"cpu_max_rss": "CPU max RSS", "cuda_max_allocated": "CUDA max allocated"}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def loss(series: Series, path: Path) -> Path:
    """All variants' loss on one chart: the curves should lie on top of each other."""
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    # Matching curves cover each other: the first is drawn wide and pale, later ones dashed on top.
    for i, (name, recs) in enumerate(series.items()):
        style = {"linewidth": 4, "alpha": 0.45} if i == 0 else {"linewidth": 1.4, "linestyle": _DASHES[(i - 1) % 3]}
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=name, **style)
    ax.set(title="Training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def validation(series: Series, path: Path, groups: Optional[dict[str, list[str]]] = None) -> Path:
    """Held-out loss at each evaluation, every variant on one chart. A variant of several runs
    (``groups``: variant -> its runs, ``train --seeds K``) is its mean over them at the steps all
    of them evaluated, in a band of ± their standard deviation."""
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    for name, runs in (groups or {n: [n] for n in series}).items():
        evals = [{r["step"]: r["val_loss"] for r in series.get(run, []) if r.get("val_loss") is not None}
                 for run in runs]
        evals = [e for e in evals if e]  # a run that failed before its first evaluation
        steps = [s for s in evals[0] if all(s in e for e in evals[1:])] if evals else []
        columns = [[e[s] for e in evals] for s in steps]
        if len(evals) == 1:
            ax.plot(steps, [c[0] for c in columns], marker="o", label=name)
        elif steps:
            mean, std = [statistics.fmean(c) for c in columns], [statistics.stdev(c) for c in columns]
            (line,) = ax.plot(steps, mean, marker="o", label=f"{name} (mean ± std over {len(evals)} seeds)")
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
    ax.set(title="Held-out loss", xlabel="step", ylabel="validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def throughput(series: Series, steady: dict[str, float | None], path: Path) -> Path:
    """Tokens/s per step, with each variant's steady-state value as a dashed line."""
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    for name, recs in series.items():
        (line,) = ax.plot([r["step"] for r in recs], [r["tokens_per_s"] for r in recs], label=name, linewidth=1.2)
        if steady.get(name):
            ax.axhline(steady[name], color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{name} steady {steady[name]:,.0f} tok/s")
    ax.set(title="Throughput", xlabel="step", ylabel="tokens / s (all workers)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def memory(peaks: dict[str, tuple[float, str]], path: Path) -> Path:
    """Peak memory per variant (rank 0), in MiB, labelled with what was measured."""
    fig = Figure(figsize=(max(4.0, 1.6 * len(peaks) + 2), 4.2))
    ax = fig.add_subplot()
    names = list(peaks)
    mib = [peaks[n][0] / 2**20 for n in names]
    bars = ax.bar(names, mib, color=[f"C{i}" for i in range(len(names))], width=0.6)
    ax.bar_label(bars, labels=[f"{m:,.0f} MiB" for m in mib], padding=2)
    kinds = sorted({_MEMORY_KINDS.get(peaks[n][1], peaks[n][1]) for n in names})
    ax.set(title=f"Peak memory ({', '.join(kinds)})", ylabel="MiB")
    ax.set_ylim(0, max(mib, default=1) * 1.18)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
