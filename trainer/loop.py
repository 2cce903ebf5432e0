"""The per-worker training loop: plain PyTorch taking a config dict, with the few Ray lines
marked ``# [ray]``. The attention choice comes only from the worker's environment
(``ATTN_IMPL``, ``DISABLE_FLASH_ATTN``), which the driver sets before the process starts.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import (builder, checkpoint, compile_mode, driver_watch, evaluate, failures, finite, hf_checkpoint,
                     location, overlap, straggler, timing)
from trainer.attention import IMPLS, choose, describe, guard
from trainer.dataset import BatchSampler, get_batch, load_dataset
from trainer.metrics import MetricsWriter, append_attempt
from trainer.optim import lr_at
from trainer.result import Progress, worker_result
from trainer.save_restore import FAULT_MARKER, Saver, restore, store_of, upload_out_dir
from trainer.worker_spec import WorkerSpec

log = logging.getLogger(__name__)

ATTN_ENV_VARS = ("ATTN_IMPL", "DISABLE_FLASH_ATTN")


def attention_from_env(environ=None) -> str:
    """The attention this worker was told to use: 'flash' or 'standard'.

    DISABLE_FLASH_ATTN=1 always wins, as it did in our users' single-machine scripts.
    """
    env = os.environ if environ is None else environ
    if guard.disabled_by_env(env):
        return "standard"
    impl = env.get("ATTN_IMPL", "flash").strip().lower()
    if impl not in IMPLS:
        raise ValueError(f"ATTN_IMPL={impl!r}; expected one of {', '.join(IMPLS)}")
    return impl


def _maybe_inject_fault(spec: WorkerSpec, step: int, rank: int, last_checkpoint: str | None) -> None:
    """Test hook: SIGKILL this worker once, at the configured rank and step.

    It first waits until Ray has committed the last checkpoint this attempt reported, so the
    fault always lands after it: tests then know exactly where the run must resume.
    """
    fault = spec.train.fault
    if fault is None or fault.kind != "kill" or fault.rank != rank or fault.step != step:
        return
    marker = Path(spec.out_dir) / FAULT_MARKER
    if marker.exists():
        return
    if last_checkpoint:
        checkpoint.wait_until_registered(store_of(spec, f"rank{rank}"), last_checkpoint)
    marker.write_text(f"rank {rank} killed at step {step}\n")
    log.warning("fault injection: killing rank %d at step %d", rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def _maybe_slow_down(spec: WorkerSpec, step: int, rank: int) -> None:
    """Test hook: the configured rank (or every rank) sleeps in each step's compute from the
    configured step on."""
    fault = spec.train.fault
    if fault is not None and fault.kind == "slow" and fault.rank in (rank, None) and step >= fault.step:
        time.sleep(fault.slow_s)


def _process_started() -> float | None:
    """When this worker's process started (epoch seconds): splits ``workers_up`` into Ray Train
    bringing the process up and what follows until the train function runs."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a missing mark only shortens the startup breakdown
        return None


def _init_dir(init_from: str) -> Path | None:
    """This node's copy of ``model.init_from`` (a URI's, fetched once per node), or None where it is gone."""
    try:
        local = location.fetched(init_from)
    except FileNotFoundError:
        return None
    return local if local.exists() else None


@failures.fail_fast  # an error no restart fixes fails the variant at once (trainer/failures.py)
def train_loop_per_worker(config: dict) -> dict:
    import ray  # [ray]
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    t_start = time.time()
    t_process = _process_started()
    driver_watch.start()  # stop at once if the driver dies (trainer/driver_watch.py)
    spec = WorkerSpec.model_validate(config)
    tc = spec.train
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    store = store_of(spec, f"rank{rank}")

    # ---------------------------------------------------------------- attention and model
    requested = attention_from_env()
    dataset = load_dataset(location.fetched(spec.data_path))  # a bucket's: this node's copy
    t_data = time.time()
    s = builder.settings(spec.model, tc, strategy=spec.strategy, vocab_size=dataset.vocab_size, device=device,
                         world_size=world)
    builder.check(s)
    if s.compiled:
        compile_mode.set_mode(tc.compile_mode)  # before the first step, where the model compiles
    if s.model.vocab_size < dataset.vocab_size:
        raise ValueError(f"model.vocab_size {s.model.vocab_size} is smaller than the data's vocab {dataset.vocab_size}")
    # Under --resume the init_from directory may be gone (the driver allows it for a run with a
    # checkpoint); a variant that restores none fails below rather than train from random weights.
    init_dir = _init_dir(spec.model.init_from) if spec.model.init_from else None
    init_gone = bool(spec.model.init_from) and init_dir is None
    init_weights = (lambda: hf_checkpoint.load_state_dict(init_dir, s.model)) if init_dir else None

    # The kernel is resolved beside the model's build (trainer/overlap.py), before it under CUDA graphs.
    looked_up, built = threading.Event(), threading.Event()

    def resolve_attention():
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
            # The node's preflight verdict, when it holds; else the fastest at this shape (cached per node).
            result = choose(requested, s.attention_shape, device, log_dir=Path(spec.out_dir).parent,
                            flash_attn_allowed=not guard.installed(), before_timing=lambda _: built.wait(),
                            looked_up=looked_up.set)
            return result, time.time()
        finally:
            looked_up.set()

    (resolved, t_attention), (model, raw_model) = overlap.resolve_beside_build(
        resolve_attention, lambda: builder.build_model(s, init_weights=init_weights),
        looked_up=looked_up, built=built, beside=not s.cudagraphs)
    # model_init: what of the build came after the check (all of it under CUDA graphs)
    training = builder.trainer(s, model, raw_model, resolved.fn)
    if rank == 0 and requested == "flash":
        log.info("Flash attention: %s", describe(resolved.kernel, resolved.timings))
    worker_info = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),  # [ray]
        "hostname": platform.node(),
        "pid": os.getpid(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],  # [ray] the node's GPUs this worker holds ([] on CPU)
        "kernel": resolved.kernel,
        "rejected_kernels": resolved.rejected,
        "preflight_verdict": resolved.verdict,
        "env": {k: os.environ[k] for k in ATTN_ENV_VARS if k in os.environ},
        "flash_attn_imports_blocked": guard.installed(),
    }
    workers = [None] * world
    dist.all_gather_object(workers, worker_info)
    kernels = {w["kernel"] for w in workers}
    if len(kernels) > 1:
        log.warning("workers run different attention kernels: %s", sorted(kernels))
    t_model = time.time()

    # ---------------------------------------------------------------- resume
    ray_ckpt = ray.train.get_checkpoint()  # [ray] the latest committed one: Ray restores it after a failure or from storage
    committed = Path(ray_ckpt.path) if ray_ckpt is not None else None
    restored = restore(store, committed, rank=rank, world=world, device=device, model=training.raw_model,
                       optimizer=training.optimizer, strategy=spec.strategy)
    if init_gone and not restored:  # a ValueError: no retry (trainer/failures.py)
        raise ValueError(f"model.init_from {spec.model.init_from}: not found, and no checkpoint holds the weights")
    start_step = restored.step if restored else 0
    if rank == 0:
        append_attempt(Path(spec.out_dir), {"time": time.time(), "start_step": start_step, "world_size": world,
                                            "restored_from": str(restored.path) if restored else None,
                                            "skipped_checkpoints": restored.skipped if restored else [],
                                            "ray_checkpoint": str(committed) if committed else None,
                                            "pid": os.getpid(), "pids": [w["pid"] for w in workers]})

    n_win, heldout = evaluate.split(dataset, tc.seq_len, val_fraction=spec.val_fraction, val_path=spec.val_path)
    if n_win < 1:
        raise ValueError(f"train.seq_len {tc.seq_len} is longer than the data ({len(dataset.tokens)} tokens)")
    evaluator = evaluate.Evaluator(heldout, tc, device=device, dtype=s.dtype, rank=rank, world=world)
    sampler = BatchSampler(seed=tc.seed, n_windows=n_win, micro_batch=tc.micro_batch_size,
                           grad_accum=tc.grad_accum_steps, world_size=world)
    if restored:  # a checkpoint of another worker count: continue at the window it stopped at
        sampler.continue_from(start_step, restored.samples_consumed)
    peak_tflops = timing.peak_tflops(device)
    writer = MetricsWriter(Path(spec.out_dir), start_step=start_step) if rank == 0 else None
    save = Saver(store, rank=rank, world=world, strategy=spec.strategy, model=training.raw_model,
                 optimizer=training.optimizer, fault=tc.fault, marker_dir=Path(spec.out_dir),
                 asynchronous=tc.checkpoint_async)

    # ---------------------------------------------------------------- train
    progress = Progress(start_step, restored_from=str(restored.path) if restored else None,
                        first_loss=restored.first_loss if restored else None,
                        record=restored.record if restored else {},  # the last logged step's metrics
                        checkpoint_block_s=save.block_s)
    watch = finite.Watch(device)  # a NaN loss stops the variant before any checkpoint holds it
    compute = straggler.ComputeTimer(device)  # this rank's time per step before it waits on the others
    t_ready, t_first_step = time.time(), None
    last_checkpoint: str | None = None
    try:
        for step in range(start_step, tc.max_steps):
            _maybe_inject_fault(spec, step + 1, rank, last_checkpoint)
            lr = lr_at(step, tc)
            batches = [get_batch(dataset.tokens, sampler.indices(step, micro, rank), tc.seq_len)
                       for micro in range(tc.grad_accum_steps)]
            compute.start()
            _maybe_slow_down(spec, step + 1, rank)
            mean_loss, grad_norm = training.step(batches, lr, before_sync=compute.stop)
            if t_first_step is None:  # startup phases: one sync, on the first step only
                mean_loss.item()
                t_first_step = time.time()
            progress.times.stepped()
            done = step + 1
            watch.stepped(done, mean_loss, grad_norm)  # no wait: checked below
            saving = done % tc.checkpoint_every == 0 or (done == tc.max_steps and tc.checkpoint_at_end)

            evaluating = evaluator.due(done)
            if done % tc.log_every == 0 or done == tc.max_steps or saving or evaluating:
                watch.check(done, world, weights=training.raw_model.parameters() if saving else None)
                if world > 1:
                    dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
                loss_value = mean_loss.item()  # host syncs (here and in the check) only on logging steps
                dt = progress.times.logged()
                if progress.first_loss is None:
                    progress.first_loss = loss_value
                progress.record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                                   "step_time_s": dt, "tokens_per_s": s.tokens_per_step / dt,
                                   "tokens": sampler.consumed(done) * tc.seq_len,
                                   **timing.per_gpu(s.tokens_per_step / dt, world, s.flops_per_token, device,
                                                    peak_tflops)}
                window = compute.window_s()
                if window:  # every rank's, to name a straggler (trainer/straggler.py)
                    windows = straggler.gather(window, device=device, world=world)
                    progress.record.update(straggler.record(windows, [w["hostname"] for w in workers]))
                if evaluating:  # held-out loss, on every rank (trainer/evaluate.py); not counted as step time
                    progress.record.update(evaluator(training.model))
                    progress.times.resume()
                if writer:
                    writer.write(progress.record)

            if saving:
                state = {"step": done, "first_loss": progress.first_loss,
                         "samples_consumed": sampler.consumed(done), "world_size": world,
                         "variant": spec.variant, "strategy": spec.strategy, "record": progress.record}
                last_checkpoint = save(done, state, {"step": done, "loss": progress.record.get("loss")}) or last_checkpoint
        save.wait()  # the last checkpoint is written and registered before the result is returned
    finally:
        save.close()  # a failure: the checkpoint in flight completes, so a resume may use it
        if writer:
            writer.close()
            upload_out_dir(spec)

    # ---------------------------------------------------------------- results (rank 0's is returned)
    return worker_result(spec, s, progress, requested=requested, kernel=resolved.kernel,
                         kernel_timings=resolved.timings, env=worker_info["env"], workers=workers,
                         params=sum(p.numel() for p in training.raw_model.parameters()),
                         timeline={"worker_process": t_process, "worker_start": t_start, "data": t_data,
                                   "attention": t_attention, "model": t_model, "ready": t_ready,
                                   "first_step": t_first_step})
