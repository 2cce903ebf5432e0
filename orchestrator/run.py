"""The Python API behind ``orchestrator train``: validate everything, then plan and launch.

Order matters for our users: every input is checked before a run directory is made or Ray
is started, so bad input costs seconds and leaves nothing behind.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import yaml

from orchestrator import capacity, interrupt, launch, plan as plan_mod, resume as resume_mod, rundir
from orchestrator import config as config_mod
from orchestrator.errors import UsageError
from trainer import data as data_mod
from trainer.loop import WorkerSpec

log = logging.getLogger(__name__)

SUMMARY_FILE, PLAN_FILE, CONFIG_FILE, OPTIONS_FILE = "summary.json", "plan.json", "config.yaml", "options.json"


@dataclass(kw_only=True)
class TrainOptions:
    """Everything ``orchestrator train`` takes; a script can build one and call ``train``."""

    config_file: Optional[str] = None
    preprocessed_data: Optional[str] = None
    disable_flash_attn: bool = False
    run_both_models: bool = False
    address: Optional[str] = None
    output_dir: str = "runs"
    max_steps: Optional[int] = None
    seed: Optional[int] = None
    name: Optional[str] = None
    debug: bool = False
    resume: Optional[str] = None  # a stopped run's directory: continue it with its own options


@dataclass
class Prepared:
    cfg: config_mod.RunConfig
    variants: list[config_mod.VariantConfig]
    data_path: Path
    vocab_size: int


def effective_options(opts: TrainOptions) -> tuple[TrainOptions, Optional[resume_mod.SavedRun]]:
    """The options this invocation runs with: as given, or under --resume the stopped run's own."""
    if not opts.resume:
        return opts, None
    saved = resume_mod.load(opts)
    return TrainOptions(**saved.options), saved


def prepare(opts: TrainOptions) -> Prepared:
    """Load and cross-check config, flags and data. Raises UsageError; touches nothing."""
    if opts.disable_flash_attn and opts.run_both_models:
        raise UsageError("--disable-flash-attn and --run-both-models contradict each other: "
                         "the flash variant cannot run with flash attention disabled")
    cfg = config_mod.load(opts.config_file)
    source = opts.config_file or "built-in config"
    cfg = config_mod.with_overrides(
        cfg, source,
        train={"max_steps": opts.max_steps, "seed": opts.seed},
        data={"path": opts.preprocessed_data} if opts.preprocessed_data else {},
    )
    variants = config_mod.variant_configs(cfg, opts.run_both_models, opts.disable_flash_attn)
    try:
        data_path = Path(cfg.data.path) if cfg.data.path else data_mod.embedded_dataset()
        dataset = data_mod.load_dataset(data_path)
    except data_mod.DataError as e:
        raise UsageError(str(e)) from None
    for v in variants:
        model, train = config_mod.resolved_sections(cfg, v)
        if model.vocab_size is not None and model.vocab_size < dataset.vocab_size:
            raise UsageError(f"{source}: model.vocab_size {model.vocab_size} is smaller than the tokenizer's "
                             f"vocab ({dataset.vocab_size}) in {data_path}")
        if data_mod.num_windows(len(dataset.tokens), train.seq_len) < 1:
            raise UsageError(f"{source}: train.seq_len {train.seq_len} is longer than the data in {data_path} "
                             f"({len(dataset.tokens)} tokens)")
    return Prepared(cfg, variants, data_path.resolve(), dataset.vocab_size)


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def make_plan(prep: Prepared, resources: dict[str, float]) -> plan_mod.Plan:
    """Variants onto the cluster. GPUs are used when asked for, or with use_gpu auto when the
    cluster has one per worker."""
    sc = prep.cfg.scaling
    gpus = resources.get("GPU", 0)
    variants = []
    for v in prep.variants:
        use_gpu = sc.use_gpu if isinstance(sc.use_gpu, bool) else gpus >= sc.num_workers
        variants.append(plan_mod.PlannedVariant(
            name=v.name, attention=v.attention, env=plan_mod.attention_env(v.attention),
            num_workers=sc.num_workers, use_gpu=use_gpu, cpus_per_worker=sc.cpus_per_worker,
        ))
    return plan_mod.Plan(variants=variants, mode="sequential")


def _versions() -> dict:
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def train(opts: TrainOptions) -> dict:
    """Run ``orchestrator train``; returns the summary (also written to summary.json).

    SIGINT/SIGTERM raise ``Interrupted`` after the workers are stopped and a summary with
    status "interrupted" is written; ``train(TrainOptions(resume=run_dir))`` continues it.
    """
    with interrupt.handle_signals():
        return _train(opts)


def _config_to_save(prep: Prepared) -> dict:
    cfg = prep.cfg.model_dump(mode="json")
    if cfg["data"]["path"]:
        cfg["data"]["path"] = str(prep.data_path)  # absolute, so --resume works from any directory
    return cfg


def _train(opts: TrainOptions) -> dict:
    opts, saved = effective_options(opts)
    prep = prepare(opts)
    source = opts.config_file or "built-in config"
    finished = saved.finished() if saved else {}
    if saved and all(v.name in finished for v in prep.variants):
        log.info("nothing to resume: every variant of %s already succeeded", saved.run_dir)
        return saved.summary
    previous = (saved.summary or {}) if saved else {}
    if saved:
        run_dir = saved.run_dir
        log.info("resuming run directory: %s", run_dir)
    else:
        run_dir = rundir.create(Path(opts.output_dir), opts.name)
        log.info("run directory: %s", run_dir)
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(_config_to_save(prep), sort_keys=False))
        rundir.write_json(run_dir / OPTIONS_FILE, asdict(opts))
    started = time.time()
    results: dict[str, dict] = {}
    address = None

    def write_summary(status: str) -> dict:
        run = {
            "name": run_dir.name, "dir": str(run_dir.resolve()), "ray_address": address,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 3), "data": str(prep.data_path),
            "command": " ".join(sys.argv), "versions": _versions(), "status": status,
        }
        if saved:
            run["resumes"] = int((previous.get("run") or {}).get("resumes", 0)) + 1
        for v in prep.variants:  # not reached before the interrupt: they run on --resume
            results.setdefault(v.name, {"status": "interrupted", "attention": v.attention, "steps": 0,
                                        "restarts": 0, "error": "not started: the run was interrupted"})
        summary = {"run": run, "variants": results}
        rundir.write_json(run_dir / SUMMARY_FILE, summary)
        return summary

    from orchestrator.session import ray_session

    try:
        with ray_session(opts.address, log_to_driver=opts.debug, keep_logs=opts.debug) as address:
            resources = cluster_resources()
            capacity.check_fits(prep.cfg.scaling, resources, source)
            plan = make_plan(prep, resources)
            rundir.write_json(run_dir / PLAN_FILE, plan.to_json())
            for line in plan.describe():
                log.info(line)
            if all(v.attention == "standard" for v in plan.variants):
                log.info("Flash Attention is disabled - will use standard attention implementation")
            for pv, vc in zip(plan.variants, prep.variants):
                if pv.name in finished:
                    log.info("[%s] already succeeded; not rerun", pv.name)
                    results[pv.name] = finished[pv.name]
                    continue
                if pv.status == "skipped":
                    results[pv.name] = launch.skipped_record(pv)
                    continue
                model, train_cfg = config_mod.resolved_sections(prep.cfg, vc)
                spec = WorkerSpec(variant=pv.name, model=model, train=train_cfg,
                                  data_path=str(prep.data_path), out_dir=str((run_dir / pv.name).resolve()))
                log.info("[%s] starting %d worker(s), %s", pv.name, pv.num_workers,
                         " ".join(f"{k}={v}" for k, v in pv.env.items()))
                record = launch.run_variant(pv, spec, max_failures=prep.cfg.scaling.max_failures,
                                            keep_checkpoints=prep.cfg.scaling.keep_checkpoints)
                before = (previous.get("variants") or {}).get(pv.name) or {}
                record["restarts"] += int(before.get("restarts") or 0)  # restarts of earlier invocations
                results[pv.name] = record
                if record["status"] == "interrupted":
                    raise interrupt.as_interrupted(KeyboardInterrupt())
    except UsageError:
        if not saved:  # found before anything ran: leave no trace of this run
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except KeyboardInterrupt as e:  # SIGINT/SIGTERM (orchestrator/interrupt.py)
        stopped = interrupt.as_interrupted(e)
        write_summary("interrupted")
        stopped.run_dir = run_dir
        raise stopped from None
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    return write_summary("failed" if failed else "succeeded")


def describe_summary(summary: dict) -> list[str]:
    """The short human summary printed at the end of a run."""
    lines = []
    for name, r in summary["variants"].items():
        if r["status"] == "succeeded":
            mem = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB" if r.get("peak_mem_bytes") else "n/a"
            lines.append(f"  {name}: succeeded, kernel {r['backend']}, {r['steps']} steps, loss "
                         f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}, {r['tokens_per_s']:.0f} tok/s, "
                         f"peak mem {mem}, restarts {r['restarts']}")
        elif r["status"] == "skipped":
            lines.append(f"  {name}: skipped ({r.get('reason')})")
        elif r["status"] == "interrupted":
            lines.append(f"  {name}: interrupted after {r.get('steps') or 0} steps")
        else:
            lines.append(f"  {name}: failed: {r['error']}")
    lines.append(f"run directory: {summary['run']['dir']}")
    return lines
