"""The worker's attention kernel from its node's preflight verdict, when one holds.

Preflight already imported, ran and compared every flash candidate on this node, and cached its
verdict under a key of what that depends on (orchestrator/preflight/cache.py). A worker whose
node still has the same key takes the verified kernel and runs only its tiny check, instead of
trying every candidate again. If that kernel fails here after all, the worker chooses exactly as
without a verdict (``attention.resolve``), marks the cache entry stale so the next run probes
again, and says so in the run's flash_attention_log.txt.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from trainer import attention

log = logging.getLogger(__name__)


def _cached_verdict(settings) -> tuple[Path | None, str | None, str, dict, float]:
    """(cache entry path, verified flash kernel or None, why none, the kernels' timings at the
    run's shape in ms, seconds waited) for this node and check. Where this node's preflight is
    still timing kernels at the run's shape (the driver went on at its facts), wait for its
    choice rather than time them again beside it."""
    from orchestrator.preflight import cache

    try:
        path = cache.entry_path(cache.node_key(settings))
    except Exception as e:  # the key is an optimisation: failing to compute it means choosing afresh
        return None, None, f"node key: {type(e).__name__}: {e}", {}, 0.0
    found, waited = cache.wait_for(path)
    if found.entry is None:
        return path, None, found.why_not, {}, waited
    verdict = found.entry.get("verdict") or {}
    if not verdict.get("flash_ok"):
        return path, None, "the cached verdict has no flash kernel for this node", {}, waited
    return path, verdict.get("flash_kernel"), "", dict(verdict.get("kernel_timings") or {}), waited


def _log_wrong_verdict(log_dir: Path, path: Path, kernel: str, error: str, chosen: str) -> None:
    from orchestrator.results import FLASH_LOG_FILE as LOG_FILE

    line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} worker {platform.node()} pid {os.getpid()}: the reused preflight "
            f"verdict (kernel {kernel}, {path}) was wrong: {error}; chose afresh: {chosen}; cache entry marked stale\n")
    try:
        with open(log_dir / LOG_FILE, "a") as f:  # one write per line: concurrent workers do not interleave
            f.write(line)
    except OSError as e:
        log.warning("could not append to %s: %s", log_dir / LOG_FILE, e)


def run_settings(tc, margs) -> dict:
    """``resolve``'s keyword arguments that say what the node's preflight keyed its verdict on,
    as a worker of this run passes them: ``tc`` the TrainConfig and ``margs`` the ModelArgs, the
    settings as configured (train.compile "auto", CUDA graphs asked for), whatever the device makes
    of them, as the driver's ``settings_for`` does."""
    from trainer import compile_mode

    return dict(dtype_setting=tc.dtype, head_dim=margs.head_dim, n_heads=margs.n_heads, n_kv_heads=margs.n_kv_heads,
                seq_len=tc.seq_len, micro_batch_size=tc.micro_batch_size, compile_setting=str(tc.compile).lower(),
                n_layers=margs.n_layers, ffn_hidden=margs.ffn_hidden,
                activation_checkpointing=margs.activation_checkpointing,
                cudagraphs=compile_mode.uses_cudagraphs(tc.compile_mode))


def resolve(requested: str, *, dtype_setting: str, log_dir: Path, device: torch.device, dtype: torch.dtype,
            head_dim: int, n_heads: int, n_kv_heads: int, flash_attn_allowed: bool = True,
            seq_len: int | None = None, micro_batch_size: int = 1, compile_setting: str = "auto",
            n_layers: int = 1, ffn_hidden: int = 0, activation_checkpointing: int = 0,
            cudagraphs: bool = False, pick: attention.Picker | None = None,
            looked_up: Callable[[], None] | None = None) -> tuple[attention.Resolved, dict]:
    """(the resolved attention, what became of the node's verdict: reused, or why not).

    ``dtype_setting`` and ``compile_setting`` are train.dtype and train.compile as configured,
    ``cudagraphs`` whether train.compile_mode replays CUDA graphs (the setting, on any device),
    and ``seq_len``/``micro_batch_size`` the run's shape: the preflight keyed its check (and its
    timing) on them. ``log_dir`` holds the run's flash_attention_log.txt. ``pick`` chooses
    among the kernels that pass when there is no verdict to reuse (``attention.resolve``).
    ``looked_up()`` is called once the verdict is looked up (after any wait for this node's
    preflight to finish timing), before any kernel runs here.
    """
    from orchestrator.preflight import cache
    from orchestrator.preflight.child import ProbeSettings

    shape = dict(device=device, dtype=dtype, head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)

    def afresh() -> attention.Resolved:
        return attention.resolve(requested, flash_attn_allowed=flash_attn_allowed, pick=pick, **shape)

    if requested != "flash":
        if looked_up is not None:
            looked_up()
        return afresh(), {"reused": False, "why_not": f"{requested} attention needs no verdict"}
    settings = ProbeSettings(head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, dtype=dtype_setting,
                             disable_flash_attn=not flash_attn_allowed, seq_len=seq_len,
                             micro_batch_size=micro_batch_size, compile=compile_setting, n_layers=n_layers,
                             ffn_hidden=ffn_hidden, activation_checkpointing=activation_checkpointing,
                             cudagraphs=cudagraphs)
    path, kernel, why_not, timings, waited = _cached_verdict(settings)
    if looked_up is not None:
        looked_up()
    waited_info = {}
    if waited >= 0.5:  # a wait worth reporting: the preflight was still timing kernels
        log.info("waited %.1f s for this node's preflight to finish timing the attention kernels", waited)
        waited_info = {"waited_s": round(waited, 3)}
    if kernel is None:
        return afresh(), {"reused": False, "why_not": why_not, **waited_info}
    try:
        # Standard attention is a choice only where preflight timed it fastest.
        if kernel not in attention.flash_candidates(device) and not (kernel == "standard" and kernel in timings):
            raise RuntimeError(f"{kernel} is not a flash candidate on {device.type}")
        fn = attention.kernel_fn(kernel)
        attention.check_kernel(fn, **shape)
    except Exception as e:  # any failure (import, launch, numerics) means the verdict no longer holds
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        resolved = afresh()
        log.warning("the preflight verdict for this node (kernel %s) was wrong here (%s); chose afresh: %s",
                    kernel, error, resolved.kernel)
        cache.mark_stale(path, f"kernel {kernel} failed in a worker: {error}")
        _log_wrong_verdict(log_dir, path, kernel, error, resolved.kernel)
        return resolved, {"reused": False, "why_not": f"verdict {kernel} was wrong: {error}", "stale": str(path)}
    # The preflight's timings come along, so the record says what the choice was made from.
    return attention.Resolved(requested, kernel, fn, timings=timings), {"reused": True, "kernel": kernel,
                                                                        "path": str(path), **waited_info}
