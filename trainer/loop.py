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

from trainer import (checkpoint, compile_mode, driver_watch, failures, finite, hf_checkpoint, import_guard, loss,
                     master_weights, overlap, parallelize, timing)
from trainer.attention import IMPLS, AttentionShape, choose, describe, unresolved
from trainer.dataset import BatchSampler, get_batch, load_dataset, num_windows
from trainer.metrics import MetricsWriter, append_attempt
from trainer.optim import lr_at, optimizer_for
from trainer.result import StepTimes, worker_result
from trainer.save_restore import FAULT_MARKER, Saver, restore
from trainer.step import Stepper, compile_enabled, training_dtype
from trainer.worker_spec import WorkerSpec

log = logging.getLogger(__name__)

ATTN_ENV_VARS = ("ATTN_IMPL", "DISABLE_FLASH_ATTN")


def attention_from_env(environ=None) -> str:
    """The attention this worker was told to use: 'flash' or 'standard'.

    DISABLE_FLASH_ATTN=1 always wins, as it did in our users' single-machine scripts.
    """
    env = os.environ if environ is None else environ
    if import_guard.disabled_by_env(env):
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
        checkpoint.wait_until_registered(Path(spec.out_dir) / checkpoint.STORAGE_NAME, last_checkpoint)
    marker.write_text(f"rank {rank} killed at step {step}\n")
    log.warning("fault injection: killing rank %d at step %d", rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def _process_started() -> float | None:
    """When this worker's process started (epoch seconds): splits ``workers_up`` into Ray Train
    bringing the process up and what follows until the train function runs."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a missing mark only shortens the startup breakdown
        return None


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
    is_gpu = device.type == "cuda"
    storage_dir = Path(spec.out_dir) / checkpoint.STORAGE_NAME

    # ---------------------------------------------------------------- attention and model
    requested = attention_from_env()
    dtype = training_dtype(tc, device)
    dataset = load_dataset(spec.data_path)
    t_data = time.time()
    margs = spec.model.args(vocab_size=dataset.vocab_size, max_seq_len=tc.seq_len,
                            activation_checkpointing=tc.activation_checkpointing, loss_impl=tc.loss_impl)
    loss.check(tc.loss_impl, device)  # liger on a CPU worker, or not installed: a config error naming the key
    weights = tc.weights_dtype(spec.strategy, device.type)  # train.param_dtype, resolved
    refusal = tc.param_dtype_refusal(device.type)
    if refusal:  # the plan refuses this first (orchestrator/run.py)
        raise ValueError(refusal)
    use_compile = compile_enabled(tc, device)
    cudagraphs = compile_mode.replays(tc.compile_mode, compiled=use_compile, device_type=device.type)
    if cudagraphs and spec.strategy == "fsdp":  # the plan refuses this first (orchestrator/run.py); bench --strategies
        raise ValueError(compile_mode.fsdp_refusal(tc.compile_mode))
    if use_compile:
        compile_mode.set_mode(tc.compile_mode)  # before the first step, where the model compiles
    if margs.vocab_size < dataset.vocab_size:
        raise ValueError(f"model.vocab_size {margs.vocab_size} is smaller than the data's vocab {dataset.vocab_size}")
    init_weights = (lambda: hf_checkpoint.load_state_dict(spec.model.init_from, margs)) if spec.model.init_from else None

    # The kernel is resolved beside the model's build (trainer/overlap.py), before it under CUDA graphs.
    looked_up, built = threading.Event(), threading.Event()

    def resolve_attention():
        try:
            if is_gpu:
                torch.cuda.set_device(device)  # the current device is per thread
            # The node's preflight verdict, when it holds; else the fastest at this shape (cached per node).
            result = choose(requested, AttentionShape.of_run(tc, margs), device, log_dir=Path(spec.out_dir).parent,
                            flash_attn_allowed=not import_guard.installed(), before_timing=lambda _: built.wait(),
                            looked_up=looked_up.set)
            return result, time.time()
        finally:
            looked_up.set()

    def build_model():
        return parallelize.build(margs, unresolved, strategy=spec.strategy, device=device, seed=tc.seed,
                                 compile=use_compile, world_size=world, init_weights=init_weights,
                                 float8=tc.float8_recipe if tc.float8 else None,
                                 whole_graph=compile_mode.whole_model(tc.compile_mode, spec.strategy),
                                 param_dtype=master_weights.torch_dtype(weights))

    (resolved, t_attention), (model, raw_model) = overlap.resolve_beside_build(
        resolve_attention, build_model, looked_up=looked_up, built=built, beside=not cudagraphs)
    # model_init: what of the build came after the check (all of it under CUDA graphs)
    parallelize.set_attention(raw_model, resolved.fn)
    if rank == 0 and requested == "flash":
        log.info("Flash attention: %s", describe(resolved.kernel, resolved.timings))
    worker_info = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),  # [ray]
        "hostname": platform.node(),
        "pid": os.getpid(),
        "device": torch.cuda.get_device_name(device) if is_gpu else "cpu",
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],  # [ray] the node's GPUs this worker holds ([] on CPU)
        "kernel": resolved.kernel,
        "rejected_kernels": resolved.rejected,
        "preflight_verdict": resolved.verdict,
        "env": {k: os.environ[k] for k in ATTN_ENV_VARS if k in os.environ},
        "flash_attn_imports_blocked": import_guard.installed(),
    }
    workers = [None] * world
    dist.all_gather_object(workers, worker_info)
    kernels = {w["kernel"] for w in workers}
    if len(kernels) > 1:
        log.warning("workers run different attention kernels: %s", sorted(kernels))

    optimizer = optimizer_for(raw_model, tc, device)  # on fp32 masters where DDP's weights are bf16
    t_model = time.time()

    # ---------------------------------------------------------------- resume
    ray_ckpt = ray.train.get_checkpoint()  # [ray] the latest committed one: Ray restores it after a failure or from storage
    committed = Path(ray_ckpt.path) if ray_ckpt is not None else None
    restored = restore(storage_dir, committed, rank=rank, world=world, device=device, model=model,
                       raw_model=raw_model, optimizer=optimizer, strategy=spec.strategy)
    start_step = restored.step if restored else 0
    first_loss = restored.first_loss if restored else None
    record: dict = restored.record if restored else {}  # the last logged step's metrics
    if rank == 0:
        append_attempt(Path(spec.out_dir), {"time": time.time(), "start_step": start_step,
                                            "restored_from": str(restored.path) if restored else None,
                                            "skipped_checkpoints": restored.skipped if restored else [],
                                            "ray_checkpoint": str(committed) if committed else None,
                                            "pid": os.getpid(), "pids": [w["pid"] for w in workers]})

    n_win = num_windows(len(dataset.tokens), tc.seq_len)
    if n_win < 1:
        raise ValueError(f"train.seq_len {tc.seq_len} is longer than the data ({len(dataset.tokens)} tokens)")
    sampler = BatchSampler(seed=tc.seed, n_windows=n_win, micro_batch=tc.micro_batch_size,
                           grad_accum=tc.grad_accum_steps, world_size=world)
    if restored:  # a checkpoint of another worker count: continue at the window it stopped at
        sampler.offset = restored.samples_consumed - start_step * sampler.samples_per_step
    tokens_per_step = sampler.samples_per_step * tc.seq_len
    peak_tflops = timing.peak_tflops(device)
    flops_per_token = margs.flops_per_token(tc.seq_len)
    writer = MetricsWriter(Path(spec.out_dir), start_step=start_step) if rank == 0 else None
    save = Saver(storage_dir, rank=rank, world=world, strategy=spec.strategy, model=raw_model, optimizer=optimizer,
                 fault=tc.fault, marker_dir=Path(spec.out_dir))

    # ---------------------------------------------------------------- train
    model.train()
    stepper = Stepper(model, optimizer, device=device, dtype=dtype, grad_accum=tc.grad_accum_steps,
                      grad_clip=tc.grad_clip, compiled=use_compile, cudagraphs=cudagraphs)
    times = StepTimes()
    watch = finite.Watch(device)  # a NaN loss stops the variant before any checkpoint holds it
    t_ready, t_first_step = time.time(), None
    last_checkpoint: str | None = None
    try:
        for step in range(start_step, tc.max_steps):
            _maybe_inject_fault(spec, step + 1, rank, last_checkpoint)
            lr = lr_at(step, tc)
            batches = [get_batch(dataset.tokens, sampler.indices(step, micro, rank), tc.seq_len)
                       for micro in range(tc.grad_accum_steps)]
            mean_loss, grad_norm = stepper(batches, lr)
            if t_first_step is None:  # startup phases: one sync, on the first step only
                mean_loss.item()
                t_first_step = time.time()
            times.stepped()
            done = step + 1
            watch.stepped(done, mean_loss, grad_norm)  # no wait: checked below
            saving = done % tc.checkpoint_every == 0 or (done == tc.max_steps and tc.checkpoint_at_end)

            if done % tc.log_every == 0 or done == tc.max_steps or saving:
                watch.check(done, world, weights=raw_model.parameters() if saving else None)
                if world > 1:
                    dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
                loss_value = mean_loss.item()  # host syncs (here and in the check) only on logging steps
                dt = times.logged()
                if first_loss is None:
                    first_loss = loss_value
                record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                          "step_time_s": dt, "tokens_per_s": tokens_per_step / dt, "tokens": done * tokens_per_step,
                          **timing.per_gpu(tokens_per_step / dt, world, flops_per_token, device, peak_tflops)}
                if writer:
                    writer.write(record)

            if saving:
                progress = {"step": done, "first_loss": first_loss, "samples_consumed": sampler.offset + done * sampler.samples_per_step,
                            "world_size": world, "variant": spec.variant, "strategy": spec.strategy, "record": record}
                last_checkpoint = save(done, progress, {"step": done, "loss": record.get("loss")}) or last_checkpoint
    except checkpoint.DiskFull as e:
        # Deterministic: a restart would hit the same full disk. The variant fails at once.
        log.error("rank %d: %s", rank, e)
        return {"variant": spec.variant, "status": "failed", "error": e.strerror, "strategy": spec.strategy}
    finally:
        if writer:
            writer.close()

    # ---------------------------------------------------------------- results (rank 0's is returned)
    return worker_result(
        spec=spec, requested=requested, kernel=resolved.kernel, env=worker_info["env"], workers=workers,
        start_step=start_step, restored_from=str(restored.path) if restored else None, first_loss=first_loss,
        record=record, times=times, device=device, world=world, dtype=dtype, compiled=use_compile,
        params=sum(p.numel() for p in raw_model.parameters()), flops_per_token=flops_per_token, param_dtype=weights,
        tokens_per_step=tokens_per_step, kernel_timings=resolved.timings, peak_tflops=peak_tflops,
        timeline={"worker_process": t_process, "worker_start": t_start, "data": t_data, "attention": t_attention,
                  "model": t_model, "ready": t_ready, "first_step": t_first_step},
    )
