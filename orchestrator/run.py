"""The Python API behind ``orchestrator train``: validate everything, then plan and launch.

Order matters for our users: every input is checked before a run directory is made or Ray
is started, so bad input costs seconds and leaves nothing behind.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import yaml

from orchestrator import config as config_mod
from orchestrator import launch, plan as plan_mod, preflight, rundir
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


@dataclass
class Prepared:
    cfg: config_mod.RunConfig
    variants: list[config_mod.VariantConfig]
    data_path: Path
    vocab_size: int


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


def preflight_settings(cfg: config_mod.RunConfig, variants: list[config_mod.VariantConfig],
                       disable_flash_attn: bool) -> preflight.ProbeSettings:
    """The attention shape the probe checks: that of the first flash variant (else the first)."""
    variant = next((v for v in variants if v.attention == "flash"), variants[0])
    model, train_cfg = config_mod.resolved_sections(cfg, variant)
    return preflight.ProbeSettings(head_dim=model.dim // model.n_heads, n_heads=model.n_heads,
                                   n_kv_heads=model.n_kv_heads or model.n_heads, dtype=train_cfg.dtype,
                                   disable_flash_attn=disable_flash_attn)


def make_plan(prep: Prepared, resources: dict[str, float],
              nodes: Optional[list[plan_mod.NodeCapacity]] = None) -> plan_mod.Plan:
    """Variants onto the cluster. GPUs are used when asked for, or with use_gpu auto when the
    cluster has one per worker. A flash variant gets standard attention when preflight found
    flash usable on no node."""
    sc = prep.cfg.scaling
    gpus = resources.get("GPU", 0)
    no_flash = None
    if nodes is not None and not any(n.flash_ok for n in nodes):
        no_flash = "flash attention works on no node: " + "; ".join(
            f"{n.node_id[:8]}: {n.flash_reason}" for n in nodes) if nodes else "flash attention: no alive nodes"
    variants = []
    for v in prep.variants:
        use_gpu = sc.use_gpu if isinstance(sc.use_gpu, bool) else gpus >= sc.num_workers
        downgrade = v.attention == "flash" and no_flash is not None
        variants.append(plan_mod.PlannedVariant(
            name=v.name, attention=v.attention, env=plan_mod.attention_env("standard" if downgrade else v.attention),
            num_workers=sc.num_workers, use_gpu=use_gpu, cpus_per_worker=sc.cpus_per_worker,
            reason=no_flash if downgrade else None,
        ))
    return plan_mod.Plan(variants=variants, mode="sequential")


def _versions() -> dict:
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def train(opts: TrainOptions) -> dict:
    """Run ``orchestrator train``; returns the summary (also written to summary.json)."""
    prep = prepare(opts)
    run_dir = rundir.create(Path(opts.output_dir), opts.name)
    started = time.time()
    log.info("run directory: %s", run_dir)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(prep.cfg.model_dump(mode="json"), sort_keys=False))
    rundir.write_json(run_dir / OPTIONS_FILE, asdict(opts))

    from orchestrator.session import ray_session

    with ray_session(opts.address, log_to_driver=opts.debug) as address:
        report = preflight.run_preflight(preflight_settings(prep.cfg, prep.variants, opts.disable_flash_attn))
        _, log_path = report.write(run_dir)
        for line in report.table():
            log.info(line)
        log.info("flash attention log: %s", log_path)
        plan = make_plan(prep, cluster_resources(), report.node_capacities())
        rundir.write_json(run_dir / PLAN_FILE, plan.to_json())
        for line in plan.describe():
            log.info(line)
        if all(v.env["ATTN_IMPL"] == "standard" for v in plan.variants):
            log.info("Flash Attention is disabled - will use standard attention implementation")
        else:
            for line in report.outcome_lines():
                log.info(line)
        results: dict[str, dict] = {}
        for pv, vc in zip(plan.variants, prep.variants):
            if pv.status == "skipped":
                results[pv.name] = launch.skipped_record(pv)
                continue
            model, train_cfg = config_mod.resolved_sections(prep.cfg, vc)
            spec = WorkerSpec(variant=pv.name, model=model, train=train_cfg,
                              data_path=str(prep.data_path), out_dir=str((run_dir / pv.name).resolve()))
            log.info("[%s] starting %d worker(s), %s", pv.name, pv.num_workers,
                     " ".join(f"{k}={v}" for k, v in pv.env.items()))
            results[pv.name] = launch.run_variant(pv, spec, max_failures=prep.cfg.scaling.max_failures,
                                                  keep_checkpoints=prep.cfg.scaling.keep_checkpoints)
            if pv.reason:  # e.g. why a flash variant ran standard attention; 'attention' stays the request
                results[pv.name].update(attention=pv.attention, reason=pv.reason)
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    summary = {
        "run": {
            "name": run_dir.name, "dir": str(run_dir.resolve()), "ray_address": address,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "duration_s": round(time.time() - started, 3), "data": str(prep.data_path),
            "command": " ".join(sys.argv), "versions": _versions(),
            "status": "failed" if failed else "succeeded",
        },
        "variants": results,
    }
    rundir.write_json(run_dir / SUMMARY_FILE, summary)
    return summary


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
        else:
            lines.append(f"  {name}: failed: {r['error']}")
    lines.append(f"run directory: {summary['run']['dir']}")
    return lines
