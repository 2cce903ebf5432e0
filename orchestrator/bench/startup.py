"""``bench --startup``: command to first step, cold and warm, against the bare Ray floor.

``train`` runs twice as a user would type it, each in a process of its own: cold (empty caches:
a new temporary preflight and compile cache) and warm (the same command again, same caches).
Each run's ``summary.json`` holds its phase breakdown (``run.startup_s``). The floor is what Ray
itself costs, measured in the same bench: a fresh process that imports Ray, starts a local Ray
and runs a no-op two-worker ``TorchTrainer.fit()``, timed from its process start to the moment
the train function runs on the workers (the floor's "first step").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from orchestrator.preflight.cache import CACHE_DIR_ENV
from trainer.compile_cache import INDUCTOR_DIR_ENV

log = logging.getLogger(__name__)

MARKER = "STARTUP-FLOOR "
RUN_TIMEOUT_S = 900.0
# The startup goals on CPU: the warm run's preflight at most 40% of the cold one's, and its
# total within 10% of the bare Ray floor.
PREFLIGHT_GOAL, FLOOR_GOAL = 0.40, 1.10

FLOOR_SCRIPT = r"""
import json, logging, os, sys, tempfile, time
import psutil
t0 = psutil.Process().create_time()
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from orchestrator.session import remove_session_dir
from trainer import ray_internals
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


def goals(cold: dict, warm: dict, floor: dict) -> dict:
    """The CPU goals, met or not, with the figures they compare."""
    out: dict = {}
    c, w = cold.get("startup_s") or {}, warm.get("startup_s") or {}
    if c.get("preflight_and_plan") and w.get("preflight_and_plan") is not None:
        ratio = w["preflight_and_plan"] / c["preflight_and_plan"]
        out["warm_preflight_over_cold"] = {"value": round(ratio, 3), "goal": PREFLIGHT_GOAL, "met": ratio <= PREFLIGHT_GOAL}
    if floor.get("total") and w.get("total"):
        ratio = w["total"] / floor["total"]
        out["warm_total_over_floor"] = {"value": round(ratio, 3), "goal": FLOOR_GOAL, "met": ratio <= FLOOR_GOAL}
    return out


def run(train_args: list[str], output_dir: Path, *, num_workers: int = 2, cwd: Optional[Path] = None) -> dict:
    """Cold and warm ``train`` and the bare floor, in that order; the report as a dict."""
    cwd = cwd or Path.cwd()
    caches = Path(tempfile.mkdtemp(prefix="fo-startup-caches-"))
    env = dict(os.environ, **{CACHE_DIR_ENV: str(caches / "preflight"), INDUCTOR_DIR_ENV: str(caches / "inductor")})
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "caches": str(caches)}
    try:
        for label in ("cold", "warm"):
            log.info("startup bench: %s run of train %s", label, " ".join(train_args))
            report[label] = train_once(train_args, env, output_dir, f"startup-{label}", cwd)
            log.info("  %s", report[label].get("startup_s") or report[label].get("error"))
        log.info("startup bench: bare Ray floor (ray.init + no-op %d-worker TorchTrainer.fit)", num_workers)
        report["floor"] = bare_floor(env, num_workers, cwd)
        log.info("  %s", report["floor"])
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    report["goals"] = goals(report["cold"], report["warm"], report["floor"])
    return report


def table(report: dict) -> list[str]:
    """Cold, warm and floor side by side, one phase a row (markdown)."""
    cold, warm = report["cold"].get("startup_s") or {}, report["warm"].get("startup_s") or {}
    floor = report["floor"]
    phases = list(dict.fromkeys([*cold, *warm]))
    lines = ["| phase | cold (s) | warm (s) | bare Ray floor (s) |", "|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
    for p in phases:
        lines.append(f"| {p} | {fmt(cold.get(p))} | {fmt(warm.get(p))} | {fmt(floor.get(p))} |")
    for name, g in report["goals"].items():
        lines.append(f"goal {name}: {g['value']:.2f} (goal <= {g['goal']:.2f}): {'met' if g['met'] else 'not met'}")
    return lines
