"""``bench --startup``: command to first step, cold and warm, against the bare Ray floor.

``train`` runs as a user would type it, each in a process of its own: cold (empty caches: a new
temporary preflight, compile and bytecode cache) and warm (the same command again, same caches); then
with ``--keep-ray`` twice: the first starts the kept head (``kept_start``), the second joins it
(``kept``: the warm mode), and ``ray-down`` stops it. The kept head's record lives in a
temporary state directory, so a head the user keeps is neither joined nor stopped. Each run's
``summary.json`` holds its phase breakdown (``run.startup_s``). The floor is what Ray itself
costs, measured in the same bench: a fresh process that imports Ray, starts a local Ray and runs
a no-op two-worker ``TorchTrainer.fit()``, timed from its process start to the moment the train
function runs on the workers (the floor's "first step").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from orchestrator import bytecode
from orchestrator.kept_ray import STATE_DIR_ENV
from orchestrator.run import MECHANISMS, STARTUP_OFF_ENV
from trainer.attention.cache import CACHE_DIR_ENV
from trainer.compile_cache import INDUCTOR_DIR_ENV

log = logging.getLogger(__name__)

MARKER = "STARTUP-FLOOR "
RUN_TIMEOUT_S = 900.0
# The startup goals on CPU: the warm run's preflight at most 40% of the cold one's (preflight_s:
# the probe that overlapped Ray's start counts), and its total within 10% of the bare Ray floor.
PREFLIGHT_GOAL, FLOOR_GOAL = 0.40, 1.10

FLOOR_SCRIPT = r"""
import json, logging, os, sys, tempfile, time
import psutil
t0 = psutil.Process().create_time()
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from orchestrator.session import remove_session_dir
from orchestrator import ray_internals
ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
t_ray = time.time()
session = ray_internals.local_session_dir()
def noop(config):
    return time.time()
with tempfile.TemporaryDirectory() as storage:
    result = TorchTrainer(noop, scaling_config=ScalingConfig(num_workers=int(sys.argv[1])),
                          run_config=RunConfig(storage_path=storage, name="floor")).fit()
t_fit = time.time()
ray.shutdown(wait_for_processes=True)
remove_session_dir(session)
t_first = result.return_value
print(sys.argv[2] + json.dumps({"ray_start": t_ray - t0, "workers_up": t_first - t_ray, "total": t_first - t0,
                                "fit_returned": t_fit - t0}), flush=True)
"""


def _run(argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _last_line(text: str) -> str:
    lines = [l for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def train_once(train_args: list[str], env: dict, output_dir: Path, name: str, cwd: Path) -> dict:
    """One ``python -m orchestrator train`` in a process of its own: its phases and wall time."""
    argv = [sys.executable, "-m", "orchestrator", "train", *train_args, "--output-dir", str(output_dir),
            "--name", name]
    started = time.time()
    proc = _run(argv, env, cwd)
    out = {"command": " ".join(["python -m orchestrator train", *train_args]), "exit_code": proc.returncode,
           "wall_s": round(time.time() - started, 3)}
    summary_path = output_dir / name / "summary.json"
    if not summary_path.is_file():
        out["error"] = _last_line(proc.stderr) or "no summary.json"
        return out
    summary = json.loads(summary_path.read_text())
    out["startup_s"] = summary["run"].get("startup_s")
    out["startup_marks"] = summary["run"].get("startup_marks")
    workers = next(iter(summary["variants"].values()), {}).get("workers") or []
    out["preflight_reused"] = "preflight: " in proc.stdout and "reused their cached result" in proc.stdout
    out["worker_verdicts"] = [w.get("preflight_verdict") for w in workers]
    return out


def bare_floor(env: dict, num_workers: int, cwd: Path) -> dict:
    """Ray's own cost: process start -> the no-op train function running on every worker."""
    proc = _run([sys.executable, "-c", FLOOR_SCRIPT, str(num_workers), MARKER], env, cwd)
    found = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
    if proc.returncode or not found:
        return {"error": _last_line(proc.stderr) or f"exit code {proc.returncode}"}
    return {k: round(v, 3) for k, v in json.loads(found[-1][len(MARKER):]).items()}


def preflight_s(phases: dict) -> Optional[float]:
    """The preflight's time: its phase, plus the part of the probe that ran during ray_start
    (``probe_overlapped``), which the phase no longer holds."""
    if phases.get("preflight_and_plan") is None:
        return None
    return phases["preflight_and_plan"] + phases.get("probe_overlapped", 0.0)


def goals(cold: dict, warm: dict, floor: dict, kept: Optional[dict] = None) -> dict:
    """The CPU goals, met or not, with the figures they compare; the kept-Ray warm run against
    the floor too, where it ran."""
    out: dict = {}
    c, w = cold.get("startup_s") or {}, warm.get("startup_s") or {}
    if preflight_s(c) and preflight_s(w) is not None:
        ratio = preflight_s(w) / preflight_s(c)
        out["warm_preflight_over_cold"] = {"value": round(ratio, 3), "goal": PREFLIGHT_GOAL, "met": ratio <= PREFLIGHT_GOAL}
    for name, run in (("warm", w), ("kept", (kept or {}).get("startup_s") or {})):
        if floor.get("total") and run.get("total"):
            ratio = run["total"] / floor["total"]
            out[f"{name}_total_over_floor"] = {"value": round(ratio, 3), "goal": FLOOR_GOAL, "met": ratio <= FLOOR_GOAL}
    return out


def ray_down(env: dict, cwd: Path) -> dict:
    """``ray-down`` for the bench's kept head: its exit code and its last line."""
    proc = _run([sys.executable, "-m", "orchestrator", "ray-down"], env, cwd)
    return {"exit_code": proc.returncode, "output": _last_line(proc.stdout) or _last_line(proc.stderr)}


# The runs of the bench, in order: (label, extra train flags).
RUNS = (("cold", []), ("warm", []), ("kept_start", ["--keep-ray"]), ("kept", ["--keep-ray"]))
COLUMNS = {"cold": "cold", "warm": "warm", "kept_start": "kept Ray, starting it", "kept": "kept Ray, warm"}


# --ab: each startup mechanism off, by the environment that turns it off.
AB_OFF = {"bytecode": {bytecode.BYTECODE_ENV: "0"}, **{m: {STARTUP_OFF_ENV: m} for m in MECHANISMS}}
# Where a mechanism must save at least this much of command-to-first-step to stay (issue 30).
KEEP_S, KEEP_FRACTION = 1.0, 0.05


def ab(train_args: list[str], env: dict, output_dir: Path, cwd: Path, repeats: int) -> dict:
    """Each mechanism's saving: warm runs with every mechanism on, then each one off, round-robin
    ``repeats`` times; then ``overlap`` again with the probe run afresh (``--fresh-preflight``),
    where the probe it overlaps is whole. Per mechanism the medians of ``startup_s.total`` on and
    off, the seconds saved and whether it clears the bar to stay."""
    cases = {"warm": [], "probe afresh": ["--fresh-preflight"]}
    labels = {"warm": ["on", *AB_OFF], "probe afresh": ["on", "overlap"]}
    totals: dict = {case: {label: [] for label in labels[case]} for case in cases}
    for case, extra in cases.items():
        for r in range(repeats):
            for label in labels[case]:
                name = f"ab-{case.replace(' ', '-')}-{label}-{r}"
                got = train_once([*train_args, *extra], {**env, **AB_OFF.get(label, {})}, output_dir, name, cwd)
                total = (got.get("startup_s") or {}).get("total")
                totals[case][label].append(total)
                log.info("  %s, %s off: %s", case, label, total or got.get("error"))
    out: dict = {"repeats": repeats, "totals_s": totals, "saved": {}}
    for case, runs in totals.items():
        on = _median(runs["on"])
        for label in labels[case][1:]:
            off = _median(runs[label])
            if on is None or off is None:
                continue
            saved = round(off - on, 3)
            out["saved"][f"{label} ({case})"] = {"on_s": on, "off_s": off, "saved_s": saved,
                                                 "keep": saved >= KEEP_S or saved >= KEEP_FRACTION * off}
    return out


def _median(values: list) -> Optional[float]:
    """The median of the runs that reported a total (a failed run reports none)."""
    ok = [v for v in values if v is not None]
    return round(statistics.median(ok), 3) if ok else None


def run(train_args: list[str], output_dir: Path, *, num_workers: int = 2, cwd: Optional[Path] = None,
        ab_repeats: int = 0) -> dict:
    """Cold and warm ``train``, the two ``--keep-ray`` runs and the bare floor, in that order, and
    with ``ab_repeats`` each mechanism's A/B (``ab``); the report as a dict."""
    cwd = cwd or Path.cwd()
    caches = Path(tempfile.mkdtemp(prefix="fo-startup-caches-"))
    env = dict(os.environ, **{CACHE_DIR_ENV: str(caches / "preflight"), INDUCTOR_DIR_ENV: str(caches / "inductor"),
                              STATE_DIR_ENV: str(caches / "state"), bytecode.BYTECODE_ENV: str(caches / "pycache")})
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "caches": str(caches)}
    try:
        for label, extra in RUNS:
            log.info("startup bench: %s run of train %s", label, " ".join([*train_args, *extra]))
            report[label] = train_once([*train_args, *extra], env, output_dir, f"startup-{label}", cwd)
            log.info("  %s", report[label].get("startup_s") or report[label].get("error"))
        report["ray_down"] = ray_down(env, cwd)
        log.info("startup bench: bare Ray floor (ray.init + no-op %d-worker TorchTrainer.fit)", num_workers)
        # The floor's processes read the bytecode the runs kept, where they kept any
        # (orchestrator/bytecode.py), so it pays the same imports as they do.
        floor_env = {**env, **bytecode.settings(env, bytecode_installed=bytecode.has_bytecode(),
                                                default_dir=caches / "pycache")}
        report["floor"] = bare_floor(floor_env, num_workers, cwd)
        log.info("  %s", report["floor"])
        if ab_repeats:
            log.info("startup bench: each mechanism off against all on, %d time(s)", ab_repeats)
            report["ab"] = ab(train_args, env, output_dir, cwd, ab_repeats)
    finally:
        if "ray_down" not in report:  # a run failed or hung: the kept head must not outlive the bench
            report["ray_down"] = ray_down(env, cwd)
        shutil.rmtree(caches, ignore_errors=True)
    report["goals"] = goals(report["cold"], report["warm"], report["floor"], report.get("kept"))
    return report


def table(report: dict) -> list[str]:
    """The runs and the floor side by side, one phase a row (markdown)."""
    runs = {label: (report.get(label) or {}).get("startup_s") or {} for label in COLUMNS}
    floor = report["floor"]
    phases = list(dict.fromkeys(p for r in runs.values() for p in r))
    lines = ["| phase | " + " | ".join(f"{c} (s)" for c in COLUMNS.values()) + " | bare Ray floor (s) |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    for p in phases:
        lines.append(f"| {p} | " + " | ".join(fmt(r.get(p)) for r in runs.values()) + f" | {fmt(floor.get(p))} |")
    for name, g in report["goals"].items():
        lines.append(f"goal {name}: {g['value']:.2f} (goal <= {g['goal']:.2f}): {'met' if g['met'] else 'not met'}")
    for name, r in (report.get("ab") or {}).get("saved", {}).items():
        lines.append(f"{name}: {r['off_s']:.1f} s off, {r['on_s']:.1f} s on: saves {r['saved_s']:.1f} s "
                     f"({'keep' if r['keep'] else 'below the bar'})")
    return lines
