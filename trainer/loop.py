"""The per-worker training loop: plain PyTorch taking a config dict, with the few Ray lines
marked ``# [ray]``. The attention choice comes only from the worker's environment
(``ATTN_IMPL``, ``DISABLE_FLASH_ATTN``), which the driver sets before the process starts.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import shutil
import signal
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict

from trainer import attention, checkpoint, import_guard
from trainer.config import ModelConfig, TrainConfig
from trainer.dataset import BatchSampler, get_batch, load_dataset, num_windows
from trainer.metrics import MetricsWriter, append_attempt
from trainer.model import Transformer
from trainer.optim import build_optimizer, lr_at
from trainer.step import Stepper, compile_enabled, training_dtype

log = logging.getLogger(__name__)

ATTN_ENV_VARS = ("ATTN_IMPL", "DISABLE_FLASH_ATTN")
FAULT_MARKER = ".fault-injected"


class WorkerSpec(BaseModel):
    """What the driver hands every worker of one variant."""

    model_config = ConfigDict(extra="forbid")
    variant: str
    model: ModelConfig
    train: TrainConfig
    data_path: str
    out_dir: str  # the variant's directory in the run directory: metrics, TensorBoard


def attention_from_env(environ=None) -> str:
    """The attention this worker was told to use: 'flash' or 'standard'.

    DISABLE_FLASH_ATTN=1 always wins, as it did in our users' single-machine scripts.
    """
    env = os.environ if environ is None else environ
    if import_guard.disabled_by_env(env):
        return "standard"
    impl = env.get("ATTN_IMPL", "flash").strip().lower()
    if impl not in attention.IMPLS:
        raise ValueError(f"ATTN_IMPL={impl!r}; expected one of {', '.join(attention.IMPLS)}")
    return impl


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def _maybe_inject_fault(spec: WorkerSpec, step: int, rank: int, last_checkpoint: str | None) -> None:
    """Test hook: SIGKILL this worker once, at the configured rank and step.

    It first waits until Ray has committed the last checkpoint this attempt reported, so the
    fault always lands after it: tests then know exactly where the run must resume.
    """
    fault = spec.train.fault
    if fault is None or fault.rank != rank or fault.step != step:
        return
    marker = Path(spec.out_dir) / FAULT_MARKER
    if marker.exists():
        return
    if last_checkpoint:
        checkpoint.wait_until_registered(Path(spec.out_dir) / checkpoint.STORAGE_NAME, last_checkpoint)
    marker.write_text(f"rank {rank} killed at step {step}\n")
    log.warning("fault injection: killing rank %d at step %d", rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def _load_latest_checkpoint(storage_dir: Path, committed: Path | None, rank: int, world: int, device: torch.device):
    """(path, state, rng) of the newest usable checkpoint, or None to start fresh.

    Rank 0 chooses (``checkpoint.newest_usable``: Ray's committed one or a newer complete
    upload, corrupt ones skipped) and tells the others, so every rank resumes from the same one.
    """
    choice = [None]
    if rank == 0:
        found = checkpoint.newest_usable(storage_dir, committed)
        choice[0] = str(found) if found else None
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    state, rng = checkpoint.read(Path(choice[0]), rank, map_location=device)
    return Path(choice[0]), state, rng


def train_loop_per_worker(config: dict) -> dict:
    import ray  # [ray]
    import ray.train  # [ray]
    import ray.train.torch  # [ray]

    t_start = time.time()
    spec = WorkerSpec.model_validate(config)
    tc = spec.train
    ctx = ray.train.get_context()  # [ray]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [ray]
    is_gpu = device.type == "cuda"

    # ---------------------------------------------------------------- attention
    requested = attention_from_env()
    dtype = training_dtype(tc, device)
    dataset = load_dataset(spec.data_path)
    margs = spec.model.args(vocab_size=dataset.vocab_size, max_seq_len=tc.seq_len,
                            activation_checkpointing=tc.activation_checkpointing)
    resolved = attention.resolve(
        requested, device=device, dtype=dtype, head_dim=margs.head_dim, n_heads=margs.n_heads,
        n_kv_heads=margs.n_kv_heads, flash_attn_allowed=not import_guard.installed(),
    )
    worker_info = {
        "rank": rank,
        "node_id": ray.get_runtime_context().get_node_id(),  # [ray]
        "hostname": platform.node(),
        "pid": os.getpid(),
        "device": torch.cuda.get_device_name(device) if is_gpu else "cpu",
        "kernel": resolved.kernel,
        "rejected_kernels": resolved.rejected,
        "env": {k: os.environ[k] for k in ATTN_ENV_VARS if k in os.environ},
        "flash_attn_imports_blocked": import_guard.installed(),
    }
    workers = [None] * world
    dist.all_gather_object(workers, worker_info)
    kernels = {w["kernel"] for w in workers}
    if len(kernels) > 1:
        log.warning("workers run different attention kernels: %s", sorted(kernels))

    # ---------------------------------------------------------------- model and optimizer
    if margs.vocab_size < dataset.vocab_size:
        raise ValueError(f"model.vocab_size {margs.vocab_size} is smaller than the data's vocab {dataset.vocab_size}")
    torch.manual_seed(tc.seed)  # same seed on every rank and variant: same initial weights
    model = Transformer(margs, resolved.fn)
    model = ray.train.torch.prepare_model(model)  # [ray] moves to device, wraps in DDP
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(raw_model, tc, device)
    use_compile = compile_enabled(tc, device)

    # ---------------------------------------------------------------- resume
    start_step, first_loss, restored_from = 0, None, None
    record: dict = {}  # the last logged step's metrics
    ray_ckpt = ray.train.get_checkpoint()  # [ray] the latest committed one: Ray restores it after a failure or from storage
    committed = Path(ray_ckpt.path) if ray_ckpt is not None else None
    loaded = _load_latest_checkpoint(Path(spec.out_dir) / checkpoint.STORAGE_NAME, committed, rank, world, device)
    if loaded is not None:
        path, state, rng = loaded
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, first_loss, restored_from = state["step"], state.get("first_loss"), str(path)
        record = state.get("record") or {}  # reported as is when the checkpoint is the last step
        if rng is not None:
            checkpoint.set_rng_state(rng)
        log.info("rank %d resumed from %s at step %d", rank, path, start_step)

    if rank == 0:
        append_attempt(Path(spec.out_dir), {"time": time.time(), "start_step": start_step,
                                            "restored_from": restored_from, "ray_checkpoint": str(committed) if committed else None,
                                            "pid": os.getpid(), "pids": [w["pid"] for w in workers]})

    n_win = num_windows(len(dataset.tokens), tc.seq_len)
    if n_win < 1:
        raise ValueError(f"train.seq_len {tc.seq_len} is longer than the data ({len(dataset.tokens)} tokens)")
    sampler = BatchSampler(seed=tc.seed, n_windows=n_win, micro_batch=tc.micro_batch_size,
                           grad_accum=tc.grad_accum_steps, world_size=world)
    tokens_per_step = sampler.samples_per_step * tc.seq_len
    writer = MetricsWriter(Path(spec.out_dir), start_step=start_step) if rank == 0 else None

    last_checkpoint: str | None = None

    def save_checkpoint(step: int, metrics: dict) -> str:
        staging = Path(spec.out_dir) / checkpoint.STAGING_DIR / f"rank{rank}-{step:08d}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            state = None
            if rank == 0:
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                         "first_loss": first_loss, "samples_consumed": step * sampler.samples_per_step,
                         "world_size": world, "variant": spec.variant, "record": record}
            checkpoint.write(staging, rank, state, world)
            ray.train.report(  # [ray] a barrier: every rank reports, rank 0's metrics are kept
                metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return f"checkpoint_{step:08d}"

    # ---------------------------------------------------------------- train
    model.train()
    stepper = Stepper(model, optimizer, device=device, dtype=dtype, grad_accum=tc.grad_accum_steps,
                      grad_clip=tc.grad_clip, compile=use_compile)
    step_times: list[float] = []
    t_ready, t_first_step = time.time(), None
    t_last, steps_since_log = time.perf_counter(), 0
    for step in range(start_step, tc.max_steps):
        _maybe_inject_fault(spec, step + 1, rank, last_checkpoint)
        lr = lr_at(step, tc)
        batches = [get_batch(dataset.tokens, sampler.indices(step, micro, rank), tc.seq_len)
                   for micro in range(tc.grad_accum_steps)]
        mean_loss, grad_norm = stepper(batches, lr)
        if t_first_step is None:  # startup phases: one sync, on the first step only
            mean_loss.item()
            t_first_step = time.time()
        steps_since_log += 1
        done = step + 1

        if done % tc.log_every == 0 or done == tc.max_steps or done % tc.checkpoint_every == 0:
            if world > 1:
                dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG)
            loss_value = mean_loss.item()  # the one host sync, only on logging steps
            now = time.perf_counter()
            dt = (now - t_last) / steps_since_log
            step_times += [dt] * steps_since_log
            t_last, steps_since_log = now, 0
            if first_loss is None:
                first_loss = loss_value
            record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                      "step_time_s": dt, "tokens_per_s": tokens_per_step / dt, "tokens": done * tokens_per_step}
            if writer:
                writer.write(record)

        if done % tc.checkpoint_every == 0 or done == tc.max_steps:
            last_checkpoint = save_checkpoint(done, {"step": done, "loss": record.get("loss")})

    # ---------------------------------------------------------------- results (rank 0's is returned)
    if writer:
        writer.close()
    # Steady state: leave out the first steps of this process (compile, allocator warm-up).
    skip = min(len(step_times) - 1, max(1, len(step_times) // 10)) if step_times else 0
    steady = step_times[skip:]
    median_step = statistics.median(steady) if steady else None
    peak, peak_kind = peak_memory_bytes(device)
    return {
        "variant": spec.variant,
        "attention": requested,
        "backend": resolved.kernel,
        "env": worker_info["env"],
        "workers": workers,
        "steps": tc.max_steps,
        "start_step": start_step,
        "restored_from": restored_from,
        "first_loss": first_loss,
        "final_loss": record.get("loss"),
        "step_time_s": median_step,
        "tokens_per_s": tokens_per_step / median_step if median_step else None,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "num_workers": world,
        "use_gpu": is_gpu,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": use_compile,
        "params": sum(p.numel() for p in raw_model.parameters()),
        "flops_per_token": margs.flops_per_token(tc.seq_len),
        "tokens_per_step": tokens_per_step,
        # Wall-clock times for the driver's startup breakdown (worker up -> ready -> first step).
        "timeline": {"worker_start": t_start, "ready": t_ready, "first_step": t_first_step},
    }
