"""Training steps in a bare process: tokens/s, MFU and peak memory per variant and sequence
length, built by the same ``trainer.builder`` as a Ray worker's training, on one device.

MFU (trainer.timing.mfu) = (6 x non-embedding params + 12 x layers x dim x seq) FLOPs per token x tokens/s over
the device's dense bf16 peak (989 TFLOP/s for H100/H200).
"""

from __future__ import annotations

import gc
import logging

import numpy as np
import torch

from trainer import attention, builder, compile_mode, parallel, timing
from trainer.config import ModelConfig, TrainConfig
from trainer.dataset import BatchSampler, get_batch, num_windows
from trainer.optim import lr_at

log = logging.getLogger(__name__)


def bench_variant(attn: str, *, model_cfg: ModelConfig, train_cfg: TrainConfig, tokens: np.ndarray,
                  vocab_size: int, device: torch.device, warmup: int, iters: int, kernel: str | None = None,
                  schedule: bool = False, keep_losses: bool = False) -> dict:
    """Train ``warmup + iters`` steps of one variant; time the last ``iters`` (median step).
    ``kernel`` forces one attention kernel (after its check) instead of resolving ``attn``.
    ``schedule``: the run's warmup + cosine learning rate over ``warmup + iters`` steps (else
    the peak lr throughout); ``keep_losses``: every step's loss in the row (``losses``)."""
    tc = train_cfg.model_copy(update={"max_steps": warmup + iters}) if schedule else train_cfg
    # One worker, as a single-worker run builds it (trainer/builder.py): no DDP wrapper.
    s = builder.settings(model_cfg, tc, strategy=parallel.DEFAULT, vocab_size=vocab_size, device=device)
    row = {"variant": attn, "seq_len": tc.seq_len, "micro_batch": tc.micro_batch_size,
           "grad_accum": tc.grad_accum_steps, "compile": s.compiled,
           "activation_checkpointing": tc.activation_checkpointing, "dtype": str(s.dtype).removeprefix("torch."),
           "loss_impl": s.train.loss_impl, "compile_mode": tc.compile_mode if s.compiled else None,
           "compile_scope": s.compile_scope, "float8": tc.float8,
           "float8_recipe": tc.float8_recipe if tc.float8 else None, "param_dtype": s.param_dtype}
    if s.refusal:  # as the plan refuses it before a run
        return {**row, "status": "error", "error": s.refusal}
    training = None
    margs = s.model
    try:
        # A fresh compile per variant: cached graphs of another model would be recompiled
        # with dynamic shapes (slower to build and to run) once the sequence length changes.
        torch._dynamo.reset()
        timing.reset_peak_memory(device)
        if kernel is None:  # as a training worker chooses: by timing at this shape (trainer/loop.py)
            resolved = attention.choose(attn, s.attention_shape, device, reuse_verdict=False)
            kernel, fn = resolved.kernel, resolved.fn
            row["timed_choice"] = bool(resolved.timings)
            if resolved.timings:
                row["kernel_timings"] = resolved.timings
        else:
            row["kernel"] = kernel
            try:
                fn = attention.checked_fn(kernel, device=device, dtype=s.dtype, head_dim=margs.head_dim,
                                          n_heads=margs.n_heads, n_kv_heads=margs.n_kv_heads)
            except ImportError as e:  # its package is not installed here: as the kernel table says it
                return {**row, "status": "unavailable", "error": f"{type(e).__name__}: {e}"}
        row["kernel"] = kernel
        builder.check(s)
        training = builder.trainer(s, *builder.build_model(s), fn)
        sampler = BatchSampler(seed=tc.seed, n_windows=num_windows(len(tokens), tc.seq_len),
                               micro_batch=tc.micro_batch_size, grad_accum=tc.grad_accum_steps, world_size=1)
        step_no = iter(range(10**9))
        losses = []

        def one_step():
            n = next(step_no)
            batches = [get_batch(tokens, sampler.indices(n, m, 0), tc.seq_len) for m in range(tc.grad_accum_steps)]
            step_loss, _ = training.step(batches, lr_at(n, tc) if schedule else tc.lr)
            losses.append(step_loss)

        with compile_mode.using(tc.compile_mode if s.compiled else "default"):  # the blocks compile at step 1
            times = timing.time_steps(one_step, device, warmup=warmup, iters=iters)
        loss_values = [float(x) for x in losses]
    except Exception as e:
        if timing.is_oom(e):
            return {**row, "status": "oom", "error": "out of memory"}
        return {**row, "status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        training = None  # free the GPU memory before the next variant
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    step_s = timing.median(times)
    tps = s.tokens_per_step / step_s
    peak = timing.peak_tflops(device)
    flops = s.flops_per_token
    return {**row, "status": "ok", "step_time_s": step_s, "tokens_per_s": tps,
            "tflops": flops * tps / 1e12, "mfu": timing.mfu(flops, tps, peak),
            "peak_mem_bytes": timing.peak_memory(device), "params": margs.non_embedding_params(),
            "first_loss": loss_values[0], "last_loss": loss_values[-1],
            "loss_finite": bool(np.isfinite(loss_values).all()), **({"losses": loss_values} if keep_losses else {})}


def run(variants: list[str], seq_lens: list[int], *, model_cfg: ModelConfig, train_cfg: TrainConfig,
        tokens: np.ndarray, vocab_size: int, device: torch.device, warmup: int, iters: int,
        tokens_per_step: int | None = None, on_row=None, kernels: list[str] | None = None,
        repeats: int = 1) -> list[dict]:
    """Each variant at each sequence length, with micro-batch max(1, tokens_per_step // seq)
    (default: the config's seq_len x micro_batch_size tokens). With ``kernels``, each kernel
    instead: the end-to-end comparison of every candidate on the same config, after the flash
    variant as a worker would choose its kernel (by timing), so the choice is measured against
    every candidate and standard in the same run. ``repeats`` > 1 trains the whole list that
    many times, round-robin (A B C A B C: drift over the run falls on every row alike), and
    returns one row per entry, the run of median tokens/s (``median_rows``)."""
    runs = ([("flash", None)] + [(k if k == "standard" else "flash", k) for k in kernels] if kernels
            else [(v, None) for v in variants])
    per_step = tokens_per_step or train_cfg.seq_len * train_cfg.micro_batch_size
    entries = [(seq, attn, kernel) for seq in seq_lens for attn, kernel in runs]
    rows = []
    for repeat in range(repeats):
        for seq, attn, kernel in entries:
            mb = max(1, per_step // seq)
            tc = train_cfg.model_copy(update={"seq_len": seq, "micro_batch_size": mb})
            row = bench_variant(attn, model_cfg=model_cfg, train_cfg=tc, tokens=tokens, vocab_size=vocab_size,
                                device=device, warmup=warmup, iters=iters, kernel=kernel)
            row["repeat"] = repeat
            mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
            # The peak is measured on CUDA only; a CPU row says so rather than "0 B".
            peak = f"peak {row['peak_mem_bytes'] / 2**30:.1f} GiB" if row.get("peak_mem_bytes") else "peak n/a"
            log.info("train %-8s seq %6d x %d: %s", kernel or attn, seq, mb,
                     f"{row['tokens_per_s']:.0f} tok/s{mfu}, {peak}"
                     if row["status"] == "ok" else f"{row['status']} {row.get('error', '')}")
            rows.append(row)
            if on_row:
                on_row(rows)
    return median_rows(rows) if repeats > 1 else rows


def _entry(row: dict) -> tuple:
    """What a row is a run of: the variant, the kernel forced (None: the variant's own choice), the length."""
    forced = row.get("kernel") if row.get("timed_choice") is None else None
    return row["variant"], forced, row["seq_len"]


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per entry (in first-seen order): its run of median tokens/s (the lower of the two
    middle ones for an even count), with every run's figure in ``tokens_per_s_runs``. An entry
    with a failed run keeps that failure: a kernel that fails once is no choice."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_entry(r), []).append(r)
    out = []
    for runs in groups.values():
        failed = next((r for r in runs if r["status"] != "ok"), None)
        if failed is not None:
            out.append(failed)
            continue
        ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
        median = ranked[(len(ranked) - 1) // 2]
        out.append({**median, "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]})
    return out
