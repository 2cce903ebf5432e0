"""The results contract: what a run leaves in its directory for people and scripts.

``summary.json`` is a ``RunSummary``: the run's own facts under ``run`` and one
``VariantResult`` per variant under ``variants``. Every producer (the worker's record through
``launch``, the records of skipped and interrupted variants) builds these types, and every
reader (``report``, ``--resume``, the CLI) reads them, so a field is named in one place. The
field tables of docs/results.md are generated from these models (orchestrator/docgen.py).

This module also owns the run directory's file names, the run status -> exit code map and the
short human summary printed at the end of ``train``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator import rundir
from orchestrator.errors import EXIT_VARIANT_SKIPPED, RunFailed
from trainer import parallel
from trainer.attention import LOG_FILE as FLASH_LOG_FILE  # these are written by the worker, which cannot import this
from trainer.metrics import ATTEMPTS_FILE, METRICS_FILE

# ---------------------------------------------------------------- the run directory

SUMMARY_FILE = "summary.json"
PLAN_FILE = "plan.json"
CONFIG_FILE = "config.yaml"
OPTIONS_FILE = "options.json"
REPORT_FILE = "report.md"
PREFLIGHT_FILE = "preflight.json"
LOSS_PNG, VAL_LOSS_PNG, THROUGHPUT_PNG, MEMORY_PNG = "loss.png", "val_loss.png", "throughput.png", "memory.png"
VARIANT_FILES = (METRICS_FILE, ATTEMPTS_FILE)  # inside <run>/<variant>/

# ---------------------------------------------------------------- statuses and exit codes

VariantStatus = Literal["succeeded", "failed", "skipped", "interrupted"]
RunStatus = Literal["succeeded", "failed", "partial", "interrupted"]

# Exit codes of ``train`` (the CLI's, and what scripts check) by settled run status.
RUN_STATUS_EXIT = {"succeeded": 0, "failed": RunFailed.exit_code, "partial": EXIT_VARIANT_SKIPPED}
EXIT_MEANING = {0: "every variant succeeded", RunFailed.exit_code: "a variant failed",
                EXIT_VARIANT_SKIPPED: "finished, but a requested variant was skipped"}


class Record(BaseModel):
    # Unknown fields are errors: a new field is added here (docs/results.md follows) or not at all.
    model_config = ConfigDict(extra="forbid")


class VariantResult(Record):
    """One variant's outcome: ``summary.json``'s ``variants.<name>``."""

    status: VariantStatus = Field(description="succeeded, failed, skipped (flash works on no node) or interrupted "
                                              "(SIGINT/SIGTERM; continue with --resume)")
    attention: str = Field(description="the attention requested: flash or standard")
    backend: Optional[str] = Field(None, description="the attention kernel that really ran (rank 0)")
    env: dict[str, str] = Field(default_factory=dict, description="the attention env vars as the workers saw them")
    reason: Optional[str] = Field(None, description="why a variant was skipped or runs standard attention")
    error: Optional[str] = Field(None, description="a failed or interrupted variant's error, one line")
    steps: int = Field(0, description="optimizer steps done")
    start_step: Optional[int] = Field(None, description="the step this attempt resumed at (0: a fresh start)")
    restored_from: Optional[str] = Field(None, description="the checkpoint the last attempt resumed from")
    first_loss: Optional[float] = Field(None, description="the loss of the first logged step")
    final_loss: Optional[float] = Field(None, description="the loss of the last logged step")
    final_val_loss: Optional[float] = Field(None, description="the held-out loss of the last evaluation "
                                            "(train.eval_every; docs/validation.md)")
    best_val_loss: Optional[float] = Field(None, description="the lowest held-out loss of any evaluation")
    best_val_step: Optional[int] = Field(None, description="the step of best_val_loss")
    eval_s: Optional[float] = Field(None, description="seconds spent in held-out evaluations, summed (not in "
                                    "step_time_s)")
    step_time_s: Optional[float] = Field(None, description="median seconds per step, steady state")
    tokens_per_s: Optional[float] = Field(None, description="tokens per second over all workers, steady state")
    peak_mem_bytes: Optional[int] = Field(None, description="rank 0's peak memory, bytes")
    peak_mem_kind: Optional[str] = Field(None, description="cuda_max_allocated or cpu_max_rss")
    num_workers: Optional[int] = Field(None, description="Ray Train workers")
    use_gpu: Optional[bool] = Field(None, description="one GPU per worker, or CPU workers")
    restarts: int = Field(0, description="worker-group restarts after failures, over every invocation")
    dtype: Optional[str] = Field(None, description="float32, or bfloat16 under autocast")
    param_dtype: Optional[Literal["fp32", "bf16"]] = Field(
        None, description="the weights' dtype in forward and backward that ran (train.param_dtype): bf16 with fp32 "
                          "masters in the optimizer (ddp) or FSDP's shards, or fp32")
    compiled: Optional[bool] = Field(None, description="torch.compile was on")
    params: Optional[int] = Field(None, description="model parameters")
    flops_per_token: Optional[float] = Field(None, description="training FLOPs per token (for MFU)")
    tokens_per_step: Optional[int] = Field(None, description="tokens per optimizer step over all workers")
    workers: list[dict[str, Any]] = Field(default_factory=list, description="per worker: rank, node_id, hostname, "
                                          "pid, device, gpu_ids, kernel, rejected_kernels, preflight_verdict, "
                                          "env, flash_attn_imports_blocked")
    timeline: Optional[dict[str, Optional[float]]] = Field(None, description="epoch seconds of worker_process (the "
                                                           "worker's process started), worker_start, data, "
                                                           "attention, model, ready, first_step (the startup "
                                                           "breakdown)")
    wall_time_s: Optional[float] = Field(None, description="seconds this invocation spent on the variant")
    started_at: Optional[float] = Field(None, description="epoch seconds the variant's fit started")
    ended_at: Optional[float] = Field(None, description="epoch seconds it ended (overlaps show concurrency)")
    strategy: Optional[parallel.Name] = Field(None, description="ddp (a full model per worker) or fsdp (sharded)")
    kernel_timings: Optional[dict[str, Any]] = Field(None, description="the attention kernels timed on the worker "
                                                     "when it chose one")
    mfu: Optional[float] = Field(None, description="model FLOPs utilisation, steady state (GPU only)")
    tokens_per_s_per_gpu: Optional[float] = Field(None, description="tokens_per_s divided by the GPUs used")
    float8: Optional[bool] = Field(None, description="train.float8: fp8 matmuls via torchao")
    float8_recipe: Optional[str] = Field(None, description="torchao's float8 recipe that ran (tensorwise); null "
                                         "without float8")
    loss_impl: Optional[str] = Field(None, description="the head + cross-entropy that ran: standard, chunked or liger")
    micro_batch_size: Optional[int] = Field(None, description="sequences per worker per micro-step that ran")
    auto: dict[str, str] = Field(default_factory=dict, description="the settings left at auto: key -> the value "
                                 "each resolved to and why, e.g. train.micro_batch_size: 12 (auto: largest that "
                                 "fits ...) by the plan, train.loss_impl by the worker")
    compile_mode: Optional[str] = Field(None, description="Inductor's mode of the compiled model; null when not "
                                        "compiled")
    compile_scope: Optional[str] = Field(None, description="what compiled as one graph: model (the whole model, "
                                         "under compile_mode reduce-overhead without fsdp) or block (each block); "
                                         "null when not compiled")
    failure_kind: Optional[str] = Field(None, description="a deterministic failure that was not retried "
                                        "(out_of_memory, no_space, config or non_finite_loss); null for others")
    stragglers: list[dict[str, Any]] = Field(
        default_factory=list, description="per rank named a straggler on a logged step (its median compute time per "
                                          "step over the last 20 steps above 1.1x the median rank's): rank, "
                                          "hostname, ratio (the highest it reached) and steps (logged steps naming "
                                          "it); docs/preflight.md")
    checkpoint_block_s: list[dict[str, Any]] = Field(
        default_factory=list, description="per checkpoint of the last attempt: step and block_s, the seconds "
                                          "training stood still for it (train.checkpoint_async)")


def validation_fields(records: list[dict]) -> dict:
    """``final_val_loss``, ``best_val_loss``, ``best_val_step`` and ``eval_s`` from a variant's
    metrics records (every attempt's: metrics.jsonl outlives restarts and resumes)."""
    evals = [r for r in records if r.get("val_loss") is not None]
    if not evals:
        return {}
    best = min(evals, key=lambda r: r["val_loss"])
    return {"final_val_loss": evals[-1]["val_loss"], "best_val_loss": best["val_loss"], "best_val_step": best["step"],
            "eval_s": round(sum(r.get("eval_s") or 0.0 for r in evals), 3)}


class SeedGroup(Record):
    """One variant trained with several seeds (``train --seeds K``): ``summary.json``'s
    ``seed_groups.<variant>``."""

    variants: list[str] = Field(description="its runs, in seed order, each a variant of its own under `variants`")
    seeds: list[int] = Field(description="each run's train.seed")
    succeeded: int = Field(description="runs that succeeded: the statistics are over them")
    step: Optional[int] = Field(None, description="the step all of them last evaluated at (their last step); null "
                                "when they differ")
    final_val_loss_mean: Optional[float] = Field(None, description="the mean over the runs of final_val_loss")
    final_val_loss_std: Optional[float] = Field(None, description="its sample standard deviation over the runs (n - 1); "
                                                "null under two")
    best_val_loss_mean: Optional[float] = Field(None, description="the mean over the runs of best_val_loss")
    best_val_loss_std: Optional[float] = Field(None, description="its sample standard deviation over the runs")


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def seed_group(runs: dict[str, int], variants: dict[str, VariantResult]) -> SeedGroup:
    """The group of ``runs`` (run name -> seed) from their records."""
    ok = [variants[n] for n in runs if n in variants and variants[n].status == "succeeded"]
    evaluated = [r for r in ok if r.final_val_loss is not None]
    final_mean, final_std = _mean_std([r.final_val_loss for r in evaluated])
    best_mean, best_std = _mean_std([r.best_val_loss for r in evaluated])
    steps = {r.steps for r in evaluated}
    return SeedGroup(variants=list(runs), seeds=list(runs.values()), succeeded=len(ok),
                     step=steps.pop() if len(steps) == 1 else None, final_val_loss_mean=final_mean,
                     final_val_loss_std=final_std, best_val_loss_mean=best_mean, best_val_loss_std=best_std)


def straggler_fields(records: list[dict]) -> dict:
    """``stragglers`` from a variant's metrics records: each rank a logged step named, with the
    highest ratio it reached and how many logged steps named it."""
    named = [s for rec in records for s in rec.get("stragglers") or []]
    out = []
    for rank in sorted({s["rank"] for s in named}):
        its = [s for s in named if s["rank"] == rank]
        out.append({**max(its, key=lambda s: s["ratio"]), "steps": len(its)})
    return {"stragglers": out} if out else {}


def named_stragglers(stragglers: list[dict]) -> str:
    """'straggler rank 1 on node-b (1.83x the median rank)', one per straggler, or ''."""
    return ", ".join(f"straggler rank {s['rank']} on {s.get('hostname') or '?'} ({s['ratio']:.2f}x the median rank)"
                     for s in stragglers)


def not_started(attention: str) -> VariantResult:
    """A variant the run never reached before it was interrupted: it runs on --resume."""
    return VariantResult(status="interrupted", attention=attention, error="not started: the run was interrupted")


class RunInfo(Record):
    """The run's own facts: ``summary.json``'s ``run``."""

    name: str = Field(description="the run directory's name")
    dir: str = Field(description="the run directory, absolute")
    status: RunStatus = Field(description="succeeded, failed (a variant failed), partial (nothing failed, a "
                                          "variant was skipped) or interrupted")
    exit_code: Optional[int] = Field(None, description="the exit code of train (null while interrupted)")
    mode: Optional[str] = Field(None, description="concurrent or sequential: how the plan ran the variants")
    ray_address: Optional[str] = Field(None, description="the Ray cluster's address")
    started: Optional[str] = Field(None, description="local time the run started, ISO 8601")
    duration_s: Optional[float] = Field(None, description="seconds from start to the summary")
    data: Optional[str] = Field(None, description="the token dataset, absolute")
    command: Optional[str] = Field(None, description="the command as typed")
    versions: dict[str, str] = Field(default_factory=dict, description="python, torch and ray on the driver")
    startup_s: Optional[dict[str, float]] = Field(None, description="seconds from command to first step by phase: "
                                                  "ray_start, preflight_and_plan, workers_up, setup, first_step, total; then parts "
                                                  "of phases: ray_init, ray_head_start, probe_overlapped, probe, "
                                                  "worker_process, worker_init, data, attention, model_init")
    startup_marks: Optional[dict[str, float]] = Field(None, description="epoch seconds of command, ray_init, ray_up, "
                                                      "probe_start, probe_end, planned, fit_start, worker_process, "
                                                      "worker_start, first_step (what overlapped)")
    resumes: int = Field(0, description="how many times --resume continued the run")


def run_status(variants: dict[str, VariantResult]) -> RunStatus:
    """failed if any variant failed; partial if none failed but one was skipped; else succeeded."""
    statuses = {r.status for r in variants.values()}
    if "failed" in statuses:
        return "failed"
    return "partial" if "skipped" in statuses else "succeeded"


def exit_code(status: str) -> int:
    """0 every requested variant succeeded; 1 a variant failed; 3 nothing failed but a
    requested variant was skipped (flash attention works on no node)."""
    return RUN_STATUS_EXIT[status]


def fmt(value: Optional[float], spec: str, missing: str = "n/a", unit: str = "") -> str:
    """A figure, or ``missing`` where none was measured (a run resumed at its last step trains no step)."""
    return missing if value is None else f"{value:{spec}}{unit}"


def spread(mean: Optional[float], std: Optional[float], spec: str = ".4f", missing: str = "n/a") -> str:
    """``mean ± std``, or the mean alone where one run gives no spread."""
    if mean is None:
        return missing
    return f"{mean:{spec}}" + ("" if std is None else f" ± {std:{spec}}")


def mib(value: Optional[int], missing: str = "n/a") -> str:
    """Bytes as MiB; 0 or None is unmeasured."""
    return fmt(value / 2**20 if value else None, ",.0f", missing, " MiB")


class RunSummary(Record):
    """``summary.json``: the results contract."""

    run: RunInfo = Field(description="the run's own facts")
    variants: dict[str, VariantResult] = Field(description="one record per variant, keyed by its name, in config order")
    seed_groups: Optional[dict[str, SeedGroup]] = Field(
        None, description="train --seeds K > 1: per variant of the config, its K runs (under `variants`) and the "
                          "mean and spread of their held-out loss; null for one seed")

    def settle(self) -> "RunSummary":
        """The status and exit code the variants' records give (a finished run)."""
        self.run.status = run_status(self.variants)
        self.run.exit_code = exit_code(self.run.status)
        return self

    def describe(self) -> list[str]:
        """The short human summary printed at the end of a run."""
        lines = []
        for name, r in self.variants.items():
            if r.status == "succeeded":
                held_out = "" if r.final_val_loss is None else \
                    f" (held-out {r.final_val_loss:.3f}, eval {fmt(r.eval_s, '.1f')} s)"
                lines.append(f"  {name}: succeeded, kernel {r.backend}, {r.steps} steps, loss "
                             f"{fmt(r.first_loss, '.3f')} -> {fmt(r.final_loss, '.3f')}{held_out}, "
                             f"{fmt(r.tokens_per_s, '.0f')} tok/s, peak mem {mib(r.peak_mem_bytes)}, "
                             f"restarts {r.restarts}"
                             + (f", {named_stragglers(r.stragglers)}" if r.stragglers else ""))
            elif r.status == "skipped":
                lines.append(f"  {name}: skipped ({r.reason})")
            elif r.status == "interrupted":
                lines.append(f"  {name}: interrupted after {r.steps} steps")
            else:
                lines.append(f"  {name}: failed: {r.error}")
        for name, g in (self.seed_groups or {}).items():
            if g.final_val_loss_mean is not None:
                lines.append(f"  {name}: held-out {spread(g.final_val_loss_mean, g.final_val_loss_std)} (mean ± std "
                             f"over {g.succeeded} seeds, step {fmt(g.step, 'd')})")
        code = exit_code(self.run.status)
        lines.append(f"exit code {code}: {EXIT_MEANING[code]}")
        lines.append(f"run directory: {self.run.dir}")
        return lines

    def write(self, run_dir: Path) -> None:
        rundir.write_json(Path(run_dir) / SUMMARY_FILE, self.model_dump(mode="json"))


def read_summary(run_dir: Path) -> Optional[RunSummary]:
    """The summary.json in ``run_dir``, or None where there is none or it is unreadable
    (a crash cut it short, or an older version wrote it)."""
    try:
        return RunSummary.model_validate(json.loads((Path(run_dir) / SUMMARY_FILE).read_text()))
    except (OSError, ValueError, ValidationError):
        return None


def field_table(model: type[BaseModel]) -> list[str]:
    """A model's fields as a markdown table (docs/results.md): name and description."""
    rows = ["| field | what |", "| --- | --- |"]
    return rows + [f"| `{name}` | {f.description} |" for name, f in model.model_fields.items()]
