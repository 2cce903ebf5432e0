"""The Python API behind ``orchestrator train``: validate everything, then plan and launch.

Order matters for our users: every input is checked before a run directory is made or Ray
is started, so bad input costs seconds and leaves nothing behind. Then the driver runs its
phases in order over one ``RunState``: connect -> probe -> plan -> open the run directory ->
execute -> finish.

What overlaps what (this machine's probe and the imports of ``_preload`` beside Ray's start):
docs/startup.md, "Overlap". Nothing before Ray's start imports torch (``tests/test_startup.py``
holds the driver to it).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from orchestrator import config as config_mod
from orchestrator import (bytecode, capacity, init_from, interrupt, kept_ray, plan as plan_mod, preflight, preprocess,
                          ray_internals, resume as resume_mod, rundir, runlock, seeds, storage)
from orchestrator.errors import InfeasibleRequest, UsageError
from orchestrator.options import TrainOptions, check_expect_gpus
from orchestrator.preflight import health, interconnect
from orchestrator.results import (CONFIG_FILE, OPTIONS_FILE, PLAN_FILE, RunInfo, RunSummary, VariantResult, not_started,
                                  run_status, seed_group)
from orchestrator.strategy import Workload
from trainer import compile_mode, dataset as dataset_mod, float8, location, parallel
from trainer.config import TrainConfig
from trainer.worker_spec import WorkerSpec

log = logging.getLogger(__name__)

__all__ = ["TrainOptions", "train", "prepare", "effective_options"]  # TrainOptions: defined in options.py


@dataclass
class Prepared:
    cfg: config_mod.RunConfig
    variants: list[config_mod.VariantConfig]
    data_path: Path  # this machine's copy
    data_source: str  # what the workers read: data_path, or the URI it came from (each node fetches its copy)
    vocab_size: int  # the dataset's: the plan's memory estimate needs the model's real shape
    data_fingerprint: dict  # the dataset's (trainer/dataset.py): --resume refuses other data
    val_source: Optional[str] = None  # data.val_path as the workers read it: absolute, or its URI
    seed_groups: dict[str, seeds.Runs] = field(default_factory=dict)  # --seeds K > 1: each variant's runs

    def started_with(self) -> dict:
        """What --resume holds the run to (orchestrator/resume.py)."""
        return resume_mod.started_with(self.cfg, self.variants, self.data_fingerprint)


def effective_options(opts: TrainOptions) -> tuple[TrainOptions, Optional[resume_mod.SavedRun]]:
    """The options this invocation runs with: as given, or under --resume the stopped run's own."""
    if not opts.resume:
        return opts, None
    if location.is_uri(opts.resume):  # the run's mirror here, its checkpoints left in the bucket
        opts = dataclasses.replace(opts, resume=str(storage.fetch_run(opts.resume, "--resume")))
    saved = resume_mod.load(opts)
    # Probing afresh, and how its health is judged, are this invocation's wishes, not properties of the run.
    return TrainOptions(**dict(saved.options, fresh_preflight=opts.fresh_preflight, expect_gpus=opts.expect_gpus,
                               allow_unhealthy=opts.allow_unhealthy)), saved


def prepare(opts: TrainOptions) -> Prepared:
    """Load and cross-check config, flags and data. Raises UsageError; touches nothing."""
    check_expect_gpus(opts.expect_gpus)
    problem = storage.output_dir_problem(opts.output_dir, os.getcwd())
    if problem:
        raise UsageError(problem)
    if location.is_uri(opts.output_dir):
        storage.check_bucket(opts.output_dir)
    if opts.keep_ray and (opts.address or os.environ.get("RAY_ADDRESS")):
        given = f"--address {opts.address}" if opts.address else f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        raise UsageError(f"--keep-ray starts or joins a local Ray of its own; drop it or {given}")
    source = opts.config_file or "built-in config"
    # init_from after --set, which may name the Hugging Face start whose model shapes it fills in
    cfg = init_from.resolve(config_mod.load(opts.config_file, opts.settings), source,
                            Path(opts.resume) if opts.resume else None)
    cfg = config_mod.with_overrides(
        cfg, source,
        train={"max_steps": opts.max_steps, "seed": opts.seed},
        data={"path": opts.preprocessed_data} if opts.preprocessed_data else {},
    )
    variants, groups = seeds.expand(cfg, config_mod.variant_configs(cfg, opts.run_both_models, opts.disable_flash_attn,
                                                                    source), opts.seeds, source)
    data_path = (storage.fetch_input(cfg.data.path, f"{source}: data.path") if cfg.data.path
                 else preprocess.embedded_dataset())
    val_path = storage.fetch_input(cfg.data.val_path, f"{source}: data.val_path") if cfg.data.val_path else None
    try:
        dataset = dataset_mod.load_dataset(data_path)
        val = dataset_mod.load_dataset(val_path) if val_path else None
    except dataset_mod.DataError as e:
        raise UsageError(str(e)) from None
    if val is not None and val.meta["tokenizer"] != dataset.meta["tokenizer"]:
        raise UsageError(f"{source}: data.val_path {cfg.data.val_path} was tokenized with another tokenizer than "
                         f"{data_path}; preprocess it with the same one")
    for v in variants:
        model, train = config_mod.resolved_sections(cfg, v)
        if train.float8 and cfg.scaling.use_gpu is False:
            raise UsageError(f"{source}: variant {v.name}: {float8.refusal(False, [])}")
        if model.vocab_size is not None and model.vocab_size < dataset.vocab_size:
            raise UsageError(f"{source}: model.vocab_size {model.vocab_size} is smaller than the tokenizer's "
                             f"vocab ({dataset.vocab_size}) in {data_path}")
        if train.warmup_steps > train.max_steps:  # legal (a short smoke run of --max-steps), but say so
            log.warning("%s: variant %s: train.warmup_steps %d exceeds train.max_steps %d: the learning rate "
                        "peaks at %.3g (of train.lr %g) and never decays", source, v.name, train.warmup_steps,
                        train.max_steps, train.lr * train.max_steps / train.warmup_steps, train.lr)
        if dataset_mod.num_windows(len(dataset.tokens), train.seq_len) < 1:
            raise UsageError(f"{source}: train.seq_len {train.seq_len} is longer than the data in {data_path} "
                             f"({len(dataset.tokens)} tokens)")
        _check_held_out(cfg.data, train, v.name, dataset, val, source)
    return Prepared(cfg, variants, data_path.resolve(), _source(cfg.data.path, data_path), dataset.vocab_size,
                    dataset_mod.fingerprint(dataset), _source(cfg.data.val_path, val_path) if val_path else None,
                    groups)


def _source(given: Optional[str], local: Path) -> str:
    """What the workers read for an input: its URI (each node fetches its copy), or the local path, absolute."""
    return given if given and location.is_uri(given) else str(local.resolve())


def _check_held_out(data: config_mod.DataConfig, train: TrainConfig, variant: str, dataset, val, source: str) -> None:
    """Refuse before launch what the worker's held-out split (trainer/evaluate.py) would."""
    n = dataset_mod.num_windows(len(dataset.tokens), train.seq_len)
    try:
        trained = dataset_mod.training_windows(n, data.held_out_fraction)
    except dataset_mod.DataError as e:
        raise UsageError(f"{source}: variant {variant}: {e}") from None
    held_out = dataset_mod.num_windows(len(val.tokens), train.seq_len) if val is not None else n - trained
    if train.eval_every and held_out < 1:
        where = f"data.val_path holds no window of train.seq_len {train.seq_len}" if val is not None else \
            "data.val_fraction is 0"
        raise UsageError(f"{source}: variant {variant}: train.eval_every {train.eval_every} needs held-out data, "
                         f"but {where}; set train.eval_every 0 to train without evaluation")


def workloads(prep: Prepared) -> dict[str, Workload]:
    """What each variant trains, for the plan's memory estimate."""
    out = {}
    for v in prep.variants:
        model, train_cfg = config_mod.resolved_sections(prep.cfg, v)
        out[v.name] = Workload(model.args(vocab_size=prep.vocab_size, max_seq_len=train_cfg.seq_len,
                                          activation_checkpointing=train_cfg.activation_checkpointing), train_cfg)
    return out


def _planned(cfg: config_mod.RunConfig, variants: list[config_mod.VariantConfig], plan: plan_mod.Plan):
    """(name, planned variant, its resolved train settings, its device type) for each variant the
    plan places: what each refusal below checks."""
    planned = {v.name: v for v in plan.variants}
    for vc in variants:
        if vc.name in planned:
            pv = planned[vc.name]
            yield vc.name, pv, config_mod.resolved_sections(cfg, vc)[1], "cuda" if pv.use_gpu else "cpu"


def float8_refusal(cfg: config_mod.RunConfig, variants: list[config_mod.VariantConfig], plan: plan_mod.Plan,
                   report: Optional[preflight.PreflightReport]) -> Optional[str]:
    """Why a variant with train.float8 cannot run where it is planned (None: all can)."""
    for name, pv, train_cfg, _ in _planned(cfg, variants, plan):
        if not train_cfg.float8:
            continue
        nodes = [n for n in (report.nodes if report else []) if not pv.nodes or n.node_id in pv.nodes]
        caps = [g["capability"] for n in nodes for g in (n.facts or {}).get("gpus") or []]
        problem = float8.refusal(pv.use_gpu, caps)
        if problem:
            return f"variant {name}: {problem}"
    return None


def cudagraphs_refusal(cfg: config_mod.RunConfig, variants: list[config_mod.VariantConfig],
                       plan: plan_mod.Plan) -> Optional[str]:
    """Why a variant with train.compile_mode reduce-overhead cannot run as planned (None: all
    can): the plan's strategy refuses it (``Strategy.refusal``: fsdp's)."""
    for name, pv, train_cfg, device_type in _planned(cfg, variants, plan):
        mode = train_cfg.compile_mode
        problem = parallel.get(pv.strategy).refusal(
            train_cfg, cudagraphs=compile_mode.replays(mode, compiled=train_cfg.compiles(device_type),
                                                       device_type=device_type))
        if problem:
            why = f" ({pv.strategy_reason})" if pv.strategy_reason else ""
            return (f"variant {name}: {problem}; the plan shards it with {pv.strategy}{why}: "
                    f"use compile_mode default, or scaling.strategy {parallel.DEFAULT} where the model fits")
    return None


def param_dtype_refusal(cfg: config_mod.RunConfig, variants: list[config_mod.VariantConfig],
                        plan: plan_mod.Plan) -> Optional[str]:
    """Why a variant's train.param_dtype bf16 cannot run as planned (None: all can): the plan
    puts it on CPU workers, which compute in fp32 under train.dtype auto."""
    for name, _, train_cfg, device_type in _planned(cfg, variants, plan):
        problem = train_cfg.param_dtype_refusal(device_type)
        if problem:
            return f"variant {name}: {problem}"
    return None


# Startup mechanisms this environment variable turns off, by name (comma-separated): how
# ``bench --startup --ab`` measures what each one saves (docs/startup.md). ``bytecode`` has its own
# switch (orchestrator/bytecode.py); a kept Ray is a flag of its own.
STARTUP_OFF_ENV = "FLASH_ORCHESTRATOR_STARTUP_OFF"
MECHANISMS = ("overlap", "preload", "coordinator")


def mechanism_on(name: str) -> bool:
    assert name in MECHANISMS, name
    return name not in os.environ.get(STARTUP_OFF_ENV, "").split(",")


# What the phases after Ray's start import: torch, the worker loop and Ray Train's TorchTrainer
# (a fresh ``python -c 'import ray.train.torch'`` took 4.4 s on the 2-core CPU machine, torch 2.1-2.5 s of it).
PRELOAD = ("orchestrator.execute", "ray.train.torch")


def _preload() -> None:
    """Import ``PRELOAD`` in a thread, so it happens while Ray starts. A module that fails to
    import here is imported again by the phase that needs it, which raises there."""

    if not mechanism_on("preload"):
        return

    def load() -> None:
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:
                log.debug("preloading %s failed; the phase that needs it will say why", name, exc_info=True)

    threading.Thread(target=load, name="preload", daemon=True).start()


def starts_ray(opts: TrainOptions) -> bool:
    """Whether this command starts a Ray: its own, or the kept head when none runs. Starting one
    is seconds in which the driver only waits, which the preload fills. Joining a running Ray
    takes well under a second, and the preload's imports, sharing the interpreter with it, made
    that 0.4 s join take 2.2 s (docs/BENCHMARKS.md): a joining command preloads once joined."""
    if opts.address or os.environ.get("RAY_ADDRESS"):
        return False
    head = kept_ray.read_record() if opts.keep_ray else None
    return head is None or not head.alive()


def _versions() -> dict:
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


NodesFn = Callable[[], list[plan_mod.NodeCapacity]]


def train(opts: TrainOptions, *, nodes: Optional[NodesFn] = None, command_started: Optional[float] = None) -> RunSummary:
    """Run ``orchestrator train``; returns the summary (also written to summary.json).

    ``nodes`` gives the planner the cluster's nodes once Ray is connected (default: preflight
    probes every node and its verdicts are the planner's view; tests inject canned nodes).
    SIGINT/SIGTERM raise ``Interrupted`` after the workers are stopped and a summary with
    status "interrupted" is written; ``train(TrainOptions(resume=run_dir))`` continues it.
    ``command_started`` (default: now) is where the startup breakdown in the summary begins;
    the CLI passes its process's start, so imports count too.
    """
    with interrupt.handle_signals(), runlock.scope():  # the run directory's lock lasts the command
        return _train(opts, nodes, command_started or time.time())


def _config_to_save(prep: Prepared) -> dict:
    cfg = prep.cfg.model_dump(mode="json")
    if cfg["data"]["path"]:
        cfg["data"]["path"] = prep.data_source  # absolute, so --resume works from any directory
    if cfg["data"]["val_path"]:
        cfg["data"]["val_path"] = prep.val_source
    return cfg


# ---------------------------------------------------------------- the driver, in phases
# connect -> probe -> plan -> open the run directory -> execute -> finish. Each phase reads and
# fills in one RunState; ``_train`` runs them in order and owns the failure paths.


@dataclass
class RunState:
    """What the driver knows so far about this invocation."""

    opts: TrainOptions
    prep: Prepared
    saved: Optional[resume_mod.SavedRun]  # the stopped run under --resume
    command_started: float
    started: float = field(default_factory=time.time)
    # Variants an earlier invocation finished are results from the start, so an interrupt at
    # any point of this one cannot write them over.
    finished: dict[str, VariantResult] = field(default_factory=dict)
    results: dict[str, VariantResult] = field(default_factory=dict)
    address: Optional[str] = None  # connect
    t_ray_init: Optional[float] = None  # when starting or joining Ray began (the startup breakdown's ray_init)
    t_ray: Optional[float] = None
    head_start_s: Optional[float] = None  # --keep-ray: seconds this command spent starting the kept head
    local_probe: Optional[preflight.LocalProbe] = None  # this machine's probe, started before Ray
    worker_env: dict[str, str] = field(default_factory=dict)  # set for every worker (the bytecode cache)
    probe_span: Optional[tuple[float, float]] = None  # probe: epoch seconds preflight began and ended
    preflight: Optional[preflight.PreflightReport] = None  # probe (None when the caller gave the nodes)
    nodes: list[plan_mod.NodeCapacity] = field(default_factory=list)
    plan: Optional[plan_mod.Plan] = None  # plan
    run_dir: Optional[Path] = None  # open the run directory
    t_plan: Optional[float] = None

    def summary(self, status: Optional[str] = None) -> RunSummary:
        """The summary as of now: settled (status None) or with ``status`` ("interrupted")."""
        for v in self.prep.variants:  # not reached before the interrupt: they run on --resume
            self.results.setdefault(v.name, not_started(v.attention))
        previous = self.saved.summary if self.saved else None
        new = {n: r for n, r in self.results.items() if n not in self.finished}
        run = RunInfo(
            name=self.run_dir.name, dir=location.uri_of(self.run_dir) or str(self.run_dir.resolve()),
            ray_address=self.address,
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            duration_s=round(time.time() - self.started, 3), data=self.prep.data_source,
            command=command_line(), versions=_versions(),
            status=status or run_status(self.results), mode=self.plan.mode if self.plan else None,
            startup_s=startup_phases(self.command_started, self.t_ray, self.t_plan, new, t_ray_init=self.t_ray_init,
                                     probe=self.probe_span, head_start_s=self.head_start_s) if self.t_plan else None,
            startup_marks=self.marks(new) if self.t_plan else None,
            resumes=(previous.run.resumes if previous else 0) + 1 if self.saved else 0,
        )
        summary = RunSummary(run=run, variants={v.name: self.results[v.name] for v in self.prep.variants},
                             seed_groups={g: seed_group(runs, self.results)
                                          for g, runs in self.prep.seed_groups.items()} or None)
        return summary.settle() if status is None else summary

    def marks(self, results: dict[str, VariantResult]) -> dict[str, float]:
        """Epoch seconds of the driver's startup events, and the first trained variant's."""
        out = {"command": self.command_started, "ray_init": self.t_ray_init, "ray_up": self.t_ray,
               "probe_start": self.probe_span[0] if self.probe_span else None,
               "probe_end": self.probe_span[1] if self.probe_span else None, "planned": self.t_plan}
        rec = next((r for r in results.values() if r.timeline and r.timeline.get("first_step")), None)
        if rec is not None:
            out.update(fit_start=rec.started_at, worker_process=rec.timeline.get("worker_process"),
                       worker_start=rec.timeline["worker_start"],
                       first_step=rec.timeline["first_step"])
        return {k: round(v, 3) for k, v in out.items() if v is not None}


def _connect(state: RunState, address: str) -> None:
    """Ray is up: check the cluster's totals, so a config that can never fit fails before nodes are probed."""
    import ray

    state.address, state.t_ray = address, time.time()
    capacity.check_fits(state.prep.cfg.scaling, dict(ray.cluster_resources()),
                        state.opts.config_file or "built-in config")
    try:  # 3 s off workers_up on a new Ray (docs/BENCHMARKS.md); the first controller makes it otherwise
        if mechanism_on("coordinator"):
            ray_internals.start_autoscaling_coordinator()
    except Exception:
        log.debug("could not start Ray Train's autoscaling coordinator early", exc_info=True)


def _probe(state: RunState, nodes: Optional[NodesFn]) -> None:
    """Every node's facts and verdicts: the planner's view of the cluster."""
    if nodes is not None:  # given by the caller (tests)
        state.nodes = nodes()
        return
    t_probe, local = time.time(), state.local_probe
    state.preflight = preflight.run_preflight(probe_settings(state), fresh=state.opts.fresh_preflight, local=local,
                                              expect_gpus=state.opts.expect_gpus)
    ended = time.time()
    if local is not None and local.ended and [n.node_id for n in state.preflight.nodes] == [local.node_id]:
        ended = local.ended  # this machine was the only node: preflight was over when its probe was
    state.probe_span = (local.started if local else t_probe, ended)
    state.nodes = plan_mod.nodes_from_preflight(state.preflight, state.opts.allow_unhealthy)


def probe_settings(state: RunState) -> preflight.ProbeSettings:
    return preflight.settings_for(state.prep.cfg, state.prep.variants, state.opts.disable_flash_attn)


def _plan(state: RunState) -> None:
    """Variants onto nodes, then the checks only a plan allows (float8's GPUs, the interconnect);
    before a new run directory exists, so an infeasible request leaves nothing behind."""
    prep, report = state.prep, state.preflight
    state.plan = plan_mod.make_plan(prep.variants, prep.cfg.scaling, state.nodes, workloads(prep),
                                    flash_disabled=state.opts.disable_flash_attn)
    problem = (float8_refusal(prep.cfg, prep.variants, state.plan, report)
               or cudagraphs_refusal(prep.cfg, prep.variants, state.plan)
               or param_dtype_refusal(prep.cfg, prep.variants, state.plan))
    if problem:
        raise UsageError(f"{state.opts.config_file or 'built-in config'}: {problem}")
    if report is not None:  # a hang in training's first all-reduce, found in seconds instead
        links = {n.node_id: health.link_class(n.facts) for n in report.nodes}
        report.interconnect = interconnect.check_plan(state.plan, setting=prep.cfg.scaling.interconnect_check,
                                                      timeout_s=prep.cfg.scaling.interconnect_timeout_s, links=links)
        if report.interconnect and report.interconnect.failures():
            for line in report.interconnect.table():
                log.info(line)
            raise InfeasibleRequest(interconnect.failure_message(report.interconnect))


def _open_run_dir(state: RunState) -> None:
    """The run directory (new, or the stopped run's under --resume) with the config, options,
    preflight files and plan; the plan and the attention outcome are printed."""
    opts, prep, plan, report = state.opts, state.prep, state.plan, state.preflight
    if state.saved:
        state.run_dir = state.saved.run_dir
        log.info("resuming run directory: %s", state.run_dir)
    else:
        state.run_dir = rundir.create(rundir.local_output_dir(opts.output_dir), opts.name)
        runlock.acquire(state.run_dir)
        log.info("run directory: %s", state.run_dir)
    run_dir = state.run_dir
    # On several nodes, all must see the run (unless it is in a bucket) and the data.
    storage.check_nodes(run_dir, prep.data_source, shared=location.uri_of(run_dir) is None)
    state.t_plan = time.time()
    if not state.saved:
        (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(_config_to_save(prep), sort_keys=False))
        rundir.write_json(run_dir / OPTIONS_FILE, asdict(opts))
        rundir.write_json(run_dir / resume_mod.STARTED_FILE, prep.started_with())
    if report is not None:
        _, log_path = report.write(run_dir)
        for line in report.table():
            log.info(line)
        log.info("flash attention log: %s", log_path)
    rundir.write_json(run_dir / PLAN_FILE, plan.to_json())
    for line in plan.describe():
        log.info(line)
    if all(v.env["ATTN_IMPL"] == "standard" for v in plan.variants):
        log.info("Flash Attention is disabled - will use standard attention implementation")
    elif report is not None:
        for line in report.outcome_lines():
            log.info(line)
    storage.publish(run_dir)  # a bucket's run can be resumed from anywhere once its config is there


def _worker_specs(state: RunState) -> dict[str, WorkerSpec]:
    """What each variant's workers are handed."""
    specs = {}
    planned = {v.name: v for v in state.plan.variants}
    remote = location.uri_of(state.run_dir)
    for vc in state.prep.variants:
        model, train_cfg = config_mod.resolved_sections(state.prep.cfg, vc)
        pv = planned[vc.name]
        train_cfg, auto = pv.resolved(train_cfg)
        specs[vc.name] = WorkerSpec(variant=vc.name, model=model, train=train_cfg, data_path=state.prep.data_source,
                                    val_fraction=state.prep.cfg.data.held_out_fraction,
                                    val_path=state.prep.val_source,
                                    out_dir=str((state.run_dir / vc.name).resolve()), strategy=pv.strategy,
                                    storage_uri=location.join(remote, vc.name) if remote else None, auto=auto)
    return specs


def _execute(state: RunState) -> None:
    """Train the variants an earlier invocation did not finish; an interrupted one stops the run."""
    plan, sc = state.plan, state.prep.cfg.scaling
    previous = state.saved.summary if state.saved else None
    for name in state.finished:
        log.info("[%s] already succeeded; not rerun", name)
    todo = plan_mod.Plan(variants=[v for v in plan.variants if v.name not in state.finished], mode=plan.mode,
                         notes=plan.notes, cluster=plan.cluster)
    from orchestrator import execute  # Ray Train and torch: loaded while Ray started (_preload), or now

    for name, record in execute.run_plan(todo, _worker_specs(state), max_failures=sc.max_failures,
                                         keep_checkpoints=sc.keep_checkpoints,
                                         placement_timeout_s=sc.placement_timeout_s,
                                         hang_timeout_s=sc.hang_timeout_s, resize_interval_s=sc.resize_interval_s,
                                         worker_env=state.worker_env).items():
        before = previous.variants.get(name) if previous else None
        record.restarts += before.restarts if before else 0
        state.results[name] = record
    if any(r.status == "interrupted" for r in state.results.values()):
        raise interrupt.as_interrupted(KeyboardInterrupt())


def _complete_preflight(state: RunState) -> None:
    """This machine's kernel timing, where it went on beside the workers' start: its complete
    result replaces the partial one in preflight.json, and flash_attention_log.txt says what it
    chose. Not waited for: the workers of this node waited for it already, when they needed it."""
    local, report = state.local_probe, state.preflight
    if local is None or not local.partial or report is None or state.run_dir is None:
        return
    raw, _ = local.final(0.0)
    facts = preflight.parse_probe(raw, local.settings.timeout_s)[0] if raw is not None else None
    if facts is None:  # still timing (no worker of this node needed it) or failed: the plan's facts stay
        return
    line = report.complete_timing(local.node_id, facts, preflight.verdict(facts), raw.get("seconds"))
    if line is not None:
        report.write_json(state.run_dir)
        with open(state.run_dir / preflight.LOG_FILE, "a") as f:
            f.write(line + "\n")


def _finish(state: RunState) -> RunSummary:
    """summary.json with the settled status, then the report."""
    _complete_preflight(state)
    summary = state.summary()
    summary.write(state.run_dir)
    _write_report(state.run_dir)
    storage.publish(state.run_dir)
    return summary


def _train(opts: TrainOptions, nodes: Optional[NodesFn], command_started: float) -> RunSummary:
    opts, saved = effective_options(opts)
    if saved:  # before anything else: a live driver of this run is never disturbed
        runlock.acquire(saved.run_dir)
    prep = prepare(opts)
    if saved:
        resume_mod.check_unchanged(saved, prep.started_with())
    state = RunState(opts=opts, prep=prep, saved=saved, command_started=command_started)
    names = {v.name for v in prep.variants}
    state.finished = {n: r for n, r in (saved.finished() if saved else {}).items() if n in names}
    state.results = dict(state.finished)
    if saved and names <= state.finished.keys():
        log.info("nothing to resume: every variant of %s already succeeded", saved.run_dir)
        # A run interrupted after its last variant finished says "interrupted": settle it.
        summary = saved.summary.settle()
        summary.write(saved.run_dir)
        return summary
    if not saved:
        rundir.check_new(opts.output_dir, opts.name)

    from orchestrator.session import ray_session

    address = opts.address
    if not (opts.address or os.environ.get("RAY_ADDRESS")):
        # A Ray of this command's own (or kept on this machine) is one machine nobody drains: Ray
        # Train's preemption watcher (an extra actor process per worker group) has nothing to watch.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Before anything this command starts (the probe, Ray, a kept head) and its own imports.
        state.worker_env = bytecode.apply()
        if nodes is None and mechanism_on("overlap"):  # this machine is the only node: its probe need not wait for Ray
            state.local_probe = preflight.LocalProbe(probe_settings(state), opts.fresh_preflight)
    starting = starts_ray(opts)
    if starting:
        _preload()  # after every input check and the environment Ray's modules read
    state.t_ray_init = time.time()
    head = None
    try:
        if opts.keep_ray:
            head, started = kept_ray.ensure()
            address = head.address
            if started:
                state.head_start_s = time.time() - state.t_ray_init
        with ray_session(address, log_to_driver=opts.debug, keep_logs=opts.debug,
                         loopback=head is not None) as address:
            if head is not None and head.session_dir is None:
                kept_ray.note_session(head, ray_internals.local_session_dir())
            _connect(state, address)
            if not starting:  # joined: the imports go on beside the probe's reuse and the plan
                _preload()
            _probe(state, nodes)
            _plan(state)
            _open_run_dir(state)
            _execute(state)
    except UsageError:
        if state.run_dir is not None and not saved:  # found before anything ran: leave no trace of this run
            shutil.rmtree(state.run_dir, ignore_errors=True)
        raise
    except KeyboardInterrupt as e:  # SIGINT/SIGTERM (orchestrator/interrupt.py)
        stopped = interrupt.as_interrupted(e)
        if state.run_dir is not None:
            state.summary("interrupted").write(state.run_dir)
            storage.publish(state.run_dir)
        stopped.run_dir = (location.uri_of(state.run_dir) or state.run_dir) if state.run_dir else None
        raise stopped from None
    finally:
        if head is not None:
            log.info("the local Ray at %s stays up for the next train --keep-ray; stop it with: %s", head.address,
                     kept_ray.DOWN_COMMAND)
    return _finish(state)


def process_started() -> float:
    import psutil

    return psutil.Process().create_time()


def command_line(argv: Optional[list[str]] = None) -> str:
    """The command as the user typed it: ``python -m orchestrator ...`` rather than the path
    Python put in argv[0] for ``-m``; a script calling ``train()`` gets its own argv."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).parts[-2:] == ("orchestrator", "__main__.py"):
        argv[0:1] = ["python", "-m", "orchestrator"]
    return shlex.join(argv)


# The parts some phases are made of, in the summary after the phases: (part, phase it belongs to).
STARTUP_PARTS = {"ray_init": "ray_start", "ray_head_start": "ray_start", "probe_overlapped": "ray_start",
                 "probe": "preflight_and_plan", "worker_process": "workers_up", "worker_init": "workers_up",
                 "data": "setup", "attention": "setup", "model_init": "setup"}


def startup_phases(t_command: float, t_ray: float, t_plan: float, results: dict[str, VariantResult], *,
                   t_ray_init: Optional[float] = None, probe: Optional[tuple[float, float]] = None,
                   head_start_s: Optional[float] = None) -> dict[str, float] | None:
    """Seconds from command to first step, by phase, for the first variant that trained; then
    the parts of some phases (``STARTUP_PARTS``; each is described in docs/startup.md, "Phases").
    The phases follow one another, so they add up to the total (less the launch's gap); the
    probe's whole time is ``probe_overlapped`` + ``probe``. ``probe`` is the (start, end) of the preflight."""
    rec = next((r for r in results.values() if r.timeline and r.timeline.get("first_step")), None)
    if rec is None:
        return None
    tl = rec.timeline
    phases = {"ray_start": t_ray - t_command, "preflight_and_plan": t_plan - t_ray,
              "workers_up": tl["worker_start"] - rec.started_at, "setup": tl["ready"] - tl["worker_start"],
              "first_step": tl["first_step"] - tl["ready"]}
    phases["total"] = tl["first_step"] - t_command
    parts = {"ray_init": t_ray - t_ray_init if t_ray_init else None, "ray_head_start": head_start_s}
    if probe is not None:
        start, end = probe
        parts["probe"] = max(0.0, end - max(start, t_ray))
        if start < t_ray:
            parts["probe_overlapped"] = min(end, t_ray) - start
    if tl.get("worker_process") and rec.started_at and tl["worker_process"] >= rec.started_at:
        # A process Ray had pooled before the fit started says nothing of this fit's own wait.
        parts.update(worker_process=tl["worker_process"] - rec.started_at,
                     worker_init=tl["worker_start"] - tl["worker_process"])
    if tl.get("model"):  # workers of this version; older ones recorded only the phase ends
        parts.update(data=tl["data"] - tl["worker_start"], attention=tl["attention"] - tl["data"],
                     model_init=tl["model"] - tl["attention"])
    phases.update({k: v for k, v in parts.items() if v is not None})
    return {k: round(v, 3) for k, v in phases.items()}


def _write_report(run_dir: Path) -> None:
    """The comparison report; a plotting problem must not turn a finished run into a failed one."""
    from orchestrator import comparison

    try:
        for line in comparison.write(run_dir).describe():
            log.info(line)
    except Exception as e:  # noqa: BLE001 - the results are in summary.json either way
        log.warning("could not write the report (%s: %s); retry with: python -m orchestrator report %s",
                    type(e).__name__, e, run_dir)
