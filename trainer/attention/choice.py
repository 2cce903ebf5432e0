"""``choose``: the one place the attention kernel is chosen, by the preflight probe and by the worker.

``standard`` is the explicit attention, no choice. For ``flash`` every candidate of the registry
on this device is checked (a tiny causal forward+backward against standard attention); among
those that pass the fastest at the run's shape wins (timed in the model's own blocks, standard
attention among them where its scores fit), and the choice is kept in the node's cache. A worker
whose node's preflight verdict still holds (same cache key) takes the verified kernel and runs
only its check; if that kernel fails here after all, it chooses afresh, marks the entry stale so
the next run probes again, and says so in the run's flash_attention_log.txt.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from trainer.attention import LOG_FILE, cache, kernels, registry, timing
from trainer.attention.kernels import standard_attention
from trainer.attention.shape import AttentionShape
from trainer.config import ATTENTIONS as IMPLS  # the names a worker can be asked for
from trainer.model import AttnFn

log = logging.getLogger(__name__)

BLOCKED = "flash-attn imports are blocked (DISABLE_FLASH_ATTN=1)"


@dataclass
class Resolved:
    requested: str
    kernel: str  # the kernel that runs: what the records name
    fn: AttnFn
    rejected: dict[str, str] = field(default_factory=dict)  # kernel -> why it was passed over
    timings: dict[str, float] = field(default_factory=dict)  # kernel -> ms per iteration, when timed
    checks: dict[str, dict] = field(default_factory=dict)  # kernel -> {"ok", "seconds", "error" | "skipped"}
    selection: dict = field(default_factory=dict)  # the timing: kernel, timings, shape, seconds (or error)
    verdict: dict = field(default_factory=dict)  # what became of the node's preflight verdict


def flash_candidates(device: torch.device) -> list[str]:
    """The flash candidates on ``device``, in the order tried (registry)."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    return registry.candidates(device.type, major)


def kernel_fn(name: str) -> AttnFn:
    """The attention function for a kernel name; importing a flash_attn package may raise."""
    if name == "standard":
        return standard_attention
    if name not in registry.BACKENDS:
        raise ValueError(f"unknown attention kernel {name!r}; expected one of {', '.join(kernel_names())}")
    return registry.BACKENDS[name].load()


def kernel_names() -> tuple[str, ...]:
    return ("standard", *registry.BACKENDS)


def checked_fn(name: str, *, device: torch.device, dtype: torch.dtype, head_dim: int, n_heads: int,
               n_kv_heads: int) -> AttnFn:
    """``kernel_fn(name)`` once it passed ``kernels.check_kernel`` here; raises when it does not.

    A kernel that refuses native GQA on this device (not every fused SDPA kernel takes it) is
    checked again with K and V repeated, so the kernel is not lost for a GQA model.
    """
    shape = dict(device=device, dtype=dtype, head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
    backend = registry.BACKENDS.get(name)
    if backend is not None and backend.max_head_dim is not None and head_dim > backend.max_head_dim:
        raise ValueError(f"head dim {head_dim} is above {name}'s {backend.max_head_dim}")
    fn = kernel_fn(name)
    try:
        kernels.check_kernel(fn, **shape)
        return fn
    except Exception:
        if backend is None or backend.repeat_kv is None or n_heads == n_kv_heads or not kernels.SDPA_HAS_GQA:
            raise
    fn = backend.repeat_kv()
    kernels.check_kernel(fn, **shape)
    return fn


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def error_text(e: BaseException, lines: int = 25) -> str:
    """The exception's type and its last ``lines`` lines: where a traceback says what went wrong."""
    return "\n".join(f"{type(e).__name__}: {e}".strip().splitlines()[-lines:])


def check(names: list[str], shape: AttentionShape, device: torch.device, dtype: torch.dtype, *,
          skip: Mapping[str, str], first_only: bool = False) -> tuple[dict[str, AttnFn], dict, dict[str, str]]:
    """(passed: kernel -> fn, checks: kernel -> result, rejected: kernel -> why, in a line). Every
    failure (import, launch, numerics) disqualifies a kernel; ``first_only`` stops at the first pass."""
    passed: dict[str, AttnFn] = {}
    checks: dict[str, dict] = {}
    rejected: dict[str, str] = {}
    for name in names:
        if name in skip:
            checks[name], rejected[name] = {"ok": False, "skipped": skip[name]}, skip[name]
            continue
        started = time.monotonic()
        try:
            passed[name] = checked_fn(name, device=device, dtype=dtype, head_dim=shape.head_dim,
                                              n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # surface asynchronous kernel errors here, not later
            checks[name] = {"ok": True}
        except Exception as e:
            passed.pop(name, None)
            checks[name] = {"ok": False, "error": error_text(e)}
            rejected[name] = f"{type(e).__name__}: {_first_line(str(e))}"
        checks[name]["seconds"] = round(time.monotonic() - started, 3)
        if first_only and passed:
            break
    return passed, checks, rejected


def fastest_here(passed: dict[str, AttnFn], shape: AttentionShape, device: torch.device, path: Optional[Path], *,
                 timer: Optional[timing.Timer] = None, budget_s: Optional[float] = None,
                 before_timing: Optional[Callable[[], None]] = None,
                 device_bytes: Optional[int] = None) -> tuple[str, dict[str, float]]:
    """The kernel to run among those that passed: the node's cached choice (at ``path``) if it is
    still among them, else the fastest when timed (standard attention too where ``times_standard``
    lets it: ``device_bytes``, the GPU's memory), else the first. ``before_timing()`` runs just before a timing starts, never when nothing is timed."""
    first = next(iter(passed))
    field_ = dict(passed)
    if timing.times_standard(shape, device_bytes):
        field_["standard"] = standard_attention
    if len(field_) == 1:
        return first, {}  # nothing to choose: no timing, no compile
    kernel, timings = cache.choice(path) if path is not None else (None, {})
    if kernel in field_:
        log.info("attention kernels: cached choice %s (%s)", timing.describe(kernel, timings), path)
        return kernel, timings
    if before_timing is not None:
        before_timing()
    sel = timing.fastest(field_, timer or timing.block_timer(shape, device), budget_s=budget_s)
    if shape.compiles(device.type) and timer is None:
        torch._dynamo.reset()  # the blocks' graphs are no use to the model's compile
    if sel.kernel is None:
        log.warning("no flash kernel could be timed; using %s (first in order)", first)
        return first, {}
    if path is not None and timing.OUT_OF_TIME not in sel.failed.values():
        cache.store_choice(path, sel.kernel, sel.timings)
    log.info("attention kernels timed: %s", timing.describe(sel.kernel, sel.timings))
    return sel.kernel, sel.timings


def choose(requested: str, shape: AttentionShape, device: torch.device, *, flash_attn_allowed: bool = True,
           skip: Optional[Mapping[str, str]] = None, reuse_verdict: bool = True, time_kernels: bool = True,
           log_dir: Optional[Path] = None, timer: Optional[timing.Timer] = None, budget_s: Optional[float] = None,
           before_timing: Optional[Callable[[dict], None]] = None,
           looked_up: Optional[Callable[[], None]] = None) -> Resolved:
    """The kernel for ``requested`` ('flash' or 'standard') on this device at ``shape``.

    ``reuse_verdict``: take the node's preflight verdict where it holds (the worker; the probe,
    which makes the verdict, does not). ``time_kernels``: time the kernels that pass at the
    shape's ``seq_len``; without, the first that passes wins and the rest are not checked.
    ``skip``: kernel -> why it is not checked (the probe: imports that failed). ``log_dir``
    holds the run's flash_attention_log.txt. ``looked_up()`` is called once the verdict is
    looked up (after any wait for this node's preflight to finish timing), before any kernel
    runs here; ``before_timing(checks)`` just before a timing starts. 'flash' falls back to
    'standard' when no fused kernel passes; the reasons land in ``rejected``.
    """
    if requested not in IMPLS:
        raise ValueError(f"unknown attention {requested!r}; expected one of {', '.join(IMPLS)}")
    dtype = torch.bfloat16 if shape.precision(device.type) == "bf16" else torch.float32
    looked_up = looked_up or (lambda: None)
    if requested == "standard":
        looked_up()
        return Resolved(requested, "standard", standard_attention,
                        verdict={"reused": False, "why_not": "standard attention needs no verdict"})
    path = None
    if reuse_verdict or time_kernels:
        try:
            path = cache.path_for(shape, not flash_attn_allowed)
        except Exception as e:  # the key is an optimisation: failing to compute it means choosing afresh
            log.warning("no attention cache on this node: %s: %s", type(e).__name__, e)
    kernel, timings, verdict = _verdict(path) if reuse_verdict else (None, {}, {})
    looked_up()
    wrong = None
    if kernel is not None:
        reused, verdict, wrong = _reuse(kernel, timings, verdict, path, shape, device, dtype)
        if reused is not None:
            return reused
    skip = dict(skip or {})
    if not flash_attn_allowed:
        skip.update({b.name: BLOCKED for b in registry.packaged() if b.name not in skip})
    passed, checks, rejected = check(flash_candidates(device), shape, device, dtype, skip=skip,
                                     first_only=not time_kernels)
    if not passed:
        log.warning("no flash kernel works on this worker; using standard attention: %s", rejected)
        kernel, timings, selection = "standard", {}, {}
    else:
        announce = (lambda: before_timing(checks)) if before_timing is not None else None
        kernel, timings, selection = _timed(passed, shape, device, path, time_kernels, timer=timer, budget_s=budget_s,
                                            before_timing=announce)
    if wrong is not None:
        log.warning("the preflight verdict for this node (kernel %s) was wrong here (%s); chose afresh: %s",
                    *wrong, kernel)
        _log_wrong_verdict(log_dir, path, *wrong, kernel)
    fn = passed.get(kernel, standard_attention)
    return Resolved(requested, kernel, fn, rejected, timings, checks, selection, verdict)


def _timed(passed: dict[str, AttnFn], shape: AttentionShape, device: torch.device, path: Optional[Path],
           time_kernels: bool, **how) -> tuple[str, dict[str, float], dict]:
    """(kernel, timings, the probe's record of the timing) among the kernels that passed."""
    kernel, timings, selection = next(iter(passed)), {}, {}
    if time_kernels and shape.seq_len:
        started = time.monotonic()
        try:
            kernel, timings = fastest_here(passed, shape, device, path, device_bytes=timing.device_memory(device), **how)
            selection = {"kernel": kernel, "timings": timings, "shape": shape.as_run(device.type)}
        except Exception as e:  # timing is an optimisation: the check's order still gives a kernel
            selection = {"error": error_text(e)}
        selection["seconds"] = round(time.monotonic() - started, 3)
    return kernel, timings, selection


def _verdict(path: Optional[Path]) -> tuple[Optional[str], dict[str, float], dict]:
    """(the node's verified kernel or None, the timings it was chosen from, what became of the
    verdict so far). Where this node's preflight is still timing kernels at the run's shape (the
    driver went on at its facts), wait for its choice rather than time them again beside it."""
    if path is None:
        return None, {}, {}
    found, waited = cache.wait_for(path)
    info = {}
    if waited >= 0.5:  # a wait worth reporting: the preflight was still timing kernels
        log.info("waited %.1f s for this node's preflight to finish timing the attention kernels", waited)
        info = {"waited_s": round(waited, 3)}
    verdict = (found.entry or {}).get("verdict") or {}
    if cache.probe_result(found) is None:
        return None, {}, {"reused": False, "why_not": found.why_not or "no cached result for this node's current state",
                          **info}
    if not verdict.get("flash_ok"):
        return None, {}, {"reused": False, "why_not": "the cached verdict has no flash kernel for this node", **info}
    return verdict.get("flash_kernel"), dict(verdict.get("kernel_timings") or {}), {"path": str(path), **info}


def _reuse(kernel: str, timings: dict[str, float], info: dict, path: Path, shape: AttentionShape,
           device: torch.device, dtype: torch.dtype) -> tuple[Optional[Resolved], dict, Optional[tuple[str, str]]]:
    """(the verified kernel once it passed its check here, else None; the verdict's record;
    (kernel, error) where the verdict was wrong, its entry then marked stale)."""
    try:
        # Standard attention is a choice only where preflight timed it fastest.
        if kernel not in flash_candidates(device) and not (kernel == "standard" and kernel in timings):
            raise RuntimeError(f"{kernel} is not a flash candidate on {device.type}")
        fn = kernel_fn(kernel)
        kernels.check_kernel(fn, device=device, dtype=dtype, head_dim=shape.head_dim, n_heads=shape.n_heads,
                             n_kv_heads=shape.n_kv_heads)
    except Exception as e:  # any failure (import, launch, numerics) means the verdict no longer holds
        error = f"{type(e).__name__}: {_first_line(str(e))}"
        cache.mark_stale(path, f"kernel {kernel} failed in a worker: {error}")
        return None, {"reused": False, "why_not": f"verdict {kernel} was wrong: {error}", "stale": str(path)}, \
            (kernel, error)
    # The preflight's timings come along, so the record says what the choice was made from.
    verdict = {"reused": True, "kernel": kernel, **info}
    return Resolved("flash", kernel, fn, timings=timings, verdict=verdict), verdict, None


def _log_wrong_verdict(log_dir: Optional[Path], path: Path, kernel: str, error: str, chosen: str) -> None:
    if log_dir is None:
        return
    line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} worker {platform.node()} pid {os.getpid()}: the reused preflight "
            f"verdict (kernel {kernel}, {path}) was wrong: {error}; chose afresh: {chosen}; cache entry marked stale\n")
    try:
        with open(log_dir / LOG_FILE, "a") as f:  # one write per line: concurrent workers do not interleave
            f.write(line)
    except OSError as e:
        log.warning("could not append to %s: %s", log_dir / LOG_FILE, e)
