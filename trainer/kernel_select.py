"""Choose the flash kernel by timing it, at the run's real shape, as the training step runs it.

A fixed kernel order lies: on one H100 FA4 beats cuDNN on the bare kernel and still made
training 2-2.5x slower (docs/BENCHMARKS.md). So every kernel that passed its correctness check
is timed forward+backward inside the model's own transformer blocks (norms, attention with its
projections and rotary, SwiGLU MLP, residuals; each block ``torch.compile``d and checkpointed
as training does it), stacked as the model stacks them, at the run's micro-batch, sequence
length, heads, KV heads, head dim, MLP width and dtype, and the fastest wins.

The decision (``fastest``) is pure, and the timer is injectable. The result is cached per node
in a JSON file keyed by GPU, driver, torch and package versions and the shape, so preflight's
timing is what the workers on that node read, and a second run costs nothing.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from trainer import atomic_write, timing
from trainer.attention import AttnFn, Picker

log = logging.getLogger(__name__)

CACHE_ENV = "FLASH_ORCHESTRATOR_KERNEL_CACHE"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "flash-orchestrator" / "kernels"
# Packages whose version changes a kernel's speed: a new one means timing again.
VERSIONED_PACKAGES = ("flash-attn", "flash-attn-3", "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cudnn-cu12",
                      "nvidia-cudnn-cu13", "torchao")

# (kernel name, attention function) -> ms per forward+backward iteration; raises when it cannot run.
Timer = Callable[[str, AttnFn], float]


@dataclass(frozen=True, kw_only=True)
class Shape:
    """What the attention block is timed at: the run's real shape."""

    seq_len: int
    micro_batch: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: str  # "bfloat16" | "float32"
    compile: bool
    n_layers: int = 1  # how many blocks hold attention scores, should standard attention win
    # The MLP's width: when set, the kernels are timed in whole transformer blocks (norms,
    # attention, SwiGLU MLP, residuals), stacked as the model stacks them (``timed_blocks``);
    # 0 times the attention block alone (projections, rotary, attention, output projection).
    ffn_hidden: int = 0
    activation_checkpointing: int = 0  # train.activation_checkpointing: every Nth block recomputes
    # The compiled model replayed as CUDA graphs (train.compile_mode: reduce-overhead): timed so
    # too, for a step whose kernel launches no longer cost CPU time ranks kernels otherwise.
    cudagraphs: bool = False

    @classmethod
    def of_run(cls, margs, *, seq_len: int, micro_batch: int, dtype: torch.dtype, compile: bool,
               cudagraphs: bool = False) -> "Shape":
        """The shape a training run times its kernels at (``margs``: the model's ModelArgs)."""
        return cls(seq_len=seq_len, micro_batch=micro_batch, n_heads=margs.n_heads, n_kv_heads=margs.n_kv_heads,
                   head_dim=margs.head_dim, dtype=str(dtype).removeprefix("torch."), compile=compile,
                   n_layers=margs.n_layers, ffn_hidden=margs.ffn_hidden,
                   activation_checkpointing=margs.activation_checkpointing, cudagraphs=compile and cudagraphs)


# Standard attention is timed too, on a GPU, where the whole model's attention scores fit in this
# share of the GPU's memory: at short sequences the compiled matmul-softmax-matmul can beat the
# fused kernels (2026-11-28, two H200s, seq 1024, head dim 64: 423,901 against SDPA flash's
# 406,151 tokens/s), and the flash variant exists to run the fastest attention. Above it the
# scores a 16-layer model keeps for backward outgrow the GPU before speed matters (seq 4096 x 4
# on the ~0.95B config: out of memory), so the block timing of one layer would mislead.
STANDARD_SCORES_SHARE = 0.10
SCORE_BYTES_PER_ELEMENT = 6  # the bf16 probabilities kept for backward and the fp32 softmax


def standard_scores_bytes(shape: Shape) -> int:
    """Bytes of attention scores standard attention keeps for backward across the model."""
    return shape.n_layers * shape.micro_batch * shape.n_heads * shape.seq_len ** 2 * SCORE_BYTES_PER_ELEMENT


def times_standard(shape: Shape, device_bytes: Optional[int]) -> bool:
    """Whether standard attention joins the timed candidates (``device_bytes``: the GPU's memory;
    None on a CPU, where the one fused candidate needs no timing)."""
    return device_bytes is not None and standard_scores_bytes(shape) <= STANDARD_SCORES_SHARE * device_bytes


@dataclass
class Selection:
    kernel: Optional[str]  # None when no candidate could be timed
    timings: dict[str, float] = field(default_factory=dict)  # kernel -> ms per iteration
    failed: dict[str, str] = field(default_factory=dict)  # kernel -> why it could not be timed
    cached: bool = False


# ---------------------------------------------------------------- the decision


OUT_OF_TIME = "not timed: the time budget was spent"


def fastest(candidates: dict[str, AttnFn], timer: Timer, *, budget_s: Optional[float] = None) -> Selection:
    """Time every candidate; the fastest wins. A candidate whose timing raises is left out, and
    so is every candidate after ``budget_s`` seconds (a partial choice, never cached)."""
    sel = Selection(None)
    started = time.monotonic()
    for name, fn in candidates.items():
        if budget_s is not None and sel.timings and time.monotonic() - started > budget_s:
            sel.failed[name] = OUT_OF_TIME
            continue
        try:
            sel.timings[name] = float(timer(name, fn))
        except Exception as e:  # a kernel that fails at the real shape (memory, launch) is not a choice
            sel.failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("kernel %s could not be timed: %s", name, sel.failed[name])
    if sel.timings:
        sel.kernel = min(sel.timings, key=sel.timings.get)
    return sel


def runner_up(kernel: str, timings: dict[str, float]) -> Optional[str]:
    others = {k: ms for k, ms in timings.items() if k != kernel}
    return min(others, key=others.get) if others else None


def describe(kernel: str, timings: dict[str, float]) -> str:
    """'kernel X (Y ms/iter), runner-up Z (W ms)', or just the kernel when nothing was timed."""
    if kernel not in timings:
        return f"kernel {kernel}"
    what = "standard attention, timed fastest" if kernel == "standard" else f"kernel {kernel}"
    text = f"{what} ({timings[kernel]:.3g} ms/iter)"
    second = runner_up(kernel, timings)
    return text + (f", runner-up {second} ({timings[second]:.3g} ms)" if second else "")


# ---------------------------------------------------------------- the per-node cache


def cache_dir(environ=None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env[CACHE_ENV]) if env.get(CACHE_ENV) else DEFAULT_CACHE_DIR


def node_versions(device: torch.device) -> dict:
    """What makes a timing valid on this node: GPU, driver, torch and package versions."""
    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device.type}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["driver"] = None
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                out["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
            finally:
                pynvml.nvmlShutdown()
        except Exception:  # no NVML: torch's CUDA version still pins the runtime
            pass
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# How block_timer measures; a new method means timing again (2: iterations queued back to back;
# 3: whole blocks, stacked; 4: under CUDA graphs, the stack compiled as one graph).
TIMER_METHOD = 4


def cache_key(shape: Shape, versions: dict) -> dict:
    return {"shape": asdict(shape), "versions": versions, "timer": TIMER_METHOD}


def _cache_path(key: dict, directory: Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return directory / f"{digest}.json"


def load(key: dict, directory: Path) -> Optional[Selection]:
    """The cached selection for ``key``; a corrupt or foreign file is ignored with a warning."""
    path = _cache_path(key, directory)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            raise ValueError("it holds another key")
        timings = {str(k): float(v) for k, v in data["timings"].items()}
        kernel = str(data["kernel"])
        if kernel not in timings:
            raise ValueError(f"its kernel {kernel} has no timing")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring the kernel cache file %s: %s", path, e)
        return None
    return Selection(kernel, timings, cached=True)


def store(key: dict, sel: Selection, directory: Path) -> None:
    """Write atomically: concurrent workers on one node never read half a file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write.write_json(_cache_path(key, directory), {"key": key, "kernel": sel.kernel, "timings": sel.timings},
                                indent=1)
    except OSError as e:  # a read-only home must not stop training
        log.warning("could not write the kernel cache in %s: %s", directory, e)


# ---------------------------------------------------------------- timing in the model's blocks


# Iterations run back to back in one timed group, so the CPU runs ahead of the GPU as it does in
# training, rather than each waiting for the one before. At small blocks this is no cure for noise:
# on two H200s at seq 1024, head dim 64 (configs/llama-small-gpu.yaml, 2026-11-28) the blocks took
# 1.7-2.1 ms timed either way, the ranking changed between runs, and the end-to-end differences
# between kernels were below 1% (docs/BENCHMARKS.md).
GROUP_S = 0.02
MAX_GROUP = 64


def group_size(seconds_per_iteration: float) -> int:
    """Iterations per timed group: about GROUP_S of GPU work, at least one."""
    return timing.group_size(seconds_per_iteration, GROUP_S, MAX_GROUP)


# How many whole blocks a timing stacks (at most; a model with fewer layers stacks them all).
# Two include one block's output feeding the next, as in the model. Deeper stacks ranked alike
# where kernels differ (one H200, the ~0.95B config: cuDNN ahead of SDPA flash by 21%, 12% and
# 11% at depths 0, 4 and 16), and cost one timing iteration per block: 179 ms at 16 against 44 ms
# at 4. Where they do not differ, no depth ranks them as the training steps do: on
# configs/llama-small-gpu.yaml every timer and the end-to-end steps changed their order from run
# to run (docs/BENCHMARKS.md, 2026-11-28 16:43 UTC, bench/kernel_timers.py).
MAX_TIMED_BLOCKS = 2


def timed_blocks(shape: Shape) -> int:
    """How many blocks ``block_timer`` stacks: one attention block without an MLP width, else the
    model's layers up to MAX_TIMED_BLOCKS."""
    return 1 if not shape.ffn_hidden else max(1, min(shape.n_layers, MAX_TIMED_BLOCKS))


def block_timer(shape: Shape, device: torch.device, *, warmup: int = 3, iters: int = 10,
                depth: Optional[int] = None) -> Timer:
    """Forward+backward with the candidate kernel, median ms per iteration over ``iters`` groups
    of iterations queued back to back (``group_size``): of ``depth`` whole transformer blocks
    (default ``timed_blocks``), each compiled on its own as training compiles them and
    checkpointed where training checkpoints it, or of one attention block where the shape has
    no MLP width. Under ``shape.cudagraphs`` the blocks compile together, as one graph replayed
    as CUDA graphs, as the whole model compiles then (``trainer.compile_mode.whole_model``), and
    every iteration starts a new graph step, as a training step does (``trainer.step.Stepper``)."""
    from trainer import compile_mode
    from trainer.model import Attention, Block, ModelArgs, rotary_tables
    from trainer.model_args import checkpointed

    dtype = getattr(torch, shape.dtype)
    dim = shape.n_heads * shape.head_dim
    whole = bool(shape.ffn_hidden)
    depth = depth or timed_blocks(shape)
    args = ModelArgs(vocab_size=1, dim=dim, n_layers=depth, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
                     ffn_hidden=shape.ffn_hidden or 1, max_seq_len=shape.seq_len)
    cos, sin = (t.to(device) for t in rotary_tables(shape.head_dim, shape.seq_len, args.rope_theta))

    def build(fn: AttnFn) -> list[torch.nn.Module]:
        blocks = ([Block(args, fn, activation_checkpointing=checkpointed(i, shape.activation_checkpointing))
                   for i in range(depth)] if whole else [Attention(args, fn)])
        for block in blocks:
            block.to(device)
        if shape.compile and shape.cudagraphs:  # one graph, as trainer.parallelize.compile_whole compiles
            stack = _Stack(blocks)
            stack.compile(dynamic=False)
            return [stack]
        for block in blocks:
            if shape.compile:
                block.compile(dynamic=False)  # as trainer.parallelize.compile_blocks does
        return blocks

    def time_ms(name: str, fn: AttnFn) -> float:
        if shape.compile:  # each kernel's graphs anew: dynamo's recompile limit must not turn one eager
            torch._dynamo.reset()
        # The run's random state is left as it was: a worker may time after building its model.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            # The blocks compile lazily, at their first call: the mode holds for the whole timing.
            with compile_mode.using(compile_mode.CUDA_GRAPHS if shape.cudagraphs else "default"):
                return timed(fn)

    def timed(fn: AttnFn) -> float:
        blocks = build(fn)
        # As in training: fp32 weights, the step under autocast.
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        x = torch.randn(shape.micro_batch, shape.seq_len, dim, device=device, requires_grad=True)
        dy = torch.randn(shape.micro_batch, shape.seq_len, dim, device=device)

        params = [p for block in blocks for p in block.parameters()]

        def step():
            if shape.cudagraphs:
                # As a training step: a new graph step, and no gradient kept from the last one
                # (a kept one would be read after its graph's next replay overwrote it).
                torch.compiler.cudagraph_mark_step_begin()
                x.grad = None
                for p in params:
                    p.grad = None
            with autocast:
                y = x
                for block in blocks:
                    y = block(y, cos, sin)
            y.backward(dy)

        try:
            alone = timing.median(timing.time_runs(step, device, warmup=warmup, iters=3))
            group = group_size(alone)

            def steps():
                for _ in range(group):
                    step()

            return timing.median(timing.time_runs(steps, device, warmup=0, iters=iters)) / group * 1e3
        finally:
            blocks = None  # the compiled blocks go before the next kernel is timed
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return time_ms


class _Stack(torch.nn.Module):
    """Timed blocks called one after the other, compiled as one module under CUDA graphs."""

    def __init__(self, blocks: list[torch.nn.Module]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cos, sin)
        return x


def device_memory(device: torch.device) -> Optional[int]:
    """The GPU's memory in bytes (``picker``'s ``device_bytes``); None off a GPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def picker(shape: Shape, device: torch.device, *, timer: Optional[Timer] = None, directory: Optional[Path] = None,
           versions: Optional[dict] = None, budget_s: Optional[float] = None,
           device_bytes: Optional[int] = None, before_timing: Optional[Callable[[], None]] = None) -> Picker:
    """``trainer.attention.resolve``'s ``pick``: the cached choice for this node and shape if it
    is still among the kernels that passed, else time them all (when there is a choice), with
    standard attention among them where ``times_standard`` lets it (``device_bytes``: the GPU's
    memory, ``device_memory(device)``; None leaves standard out). The choice may be ``"standard"``.
    ``before_timing()`` is called just before the timing starts, never when nothing is timed."""

    def pick(passed: dict[str, AttnFn]) -> tuple[str, dict[str, float]]:
        first = next(iter(passed))
        field = dict(passed)
        if times_standard(shape, device_bytes):
            from trainer.attention import standard_attention

            field["standard"] = standard_attention
        if len(field) == 1:
            return first, {}  # nothing to choose: no timing, no compile
        key = cache_key(shape, versions if versions is not None else node_versions(device))
        where = directory if directory is not None else cache_dir()
        cached = load(key, where)
        if cached is not None and cached.kernel in field:
            log.info("attention kernels: cached choice %s (%s)", describe(cached.kernel, cached.timings), where)
            return cached.kernel, cached.timings
        if before_timing is not None:
            before_timing()
        sel = fastest(field, timer or block_timer(shape, device), budget_s=budget_s)
        if shape.compile and timer is None:
            torch._dynamo.reset()  # the blocks' graphs are no use to the model's compile
        if sel.kernel is None:
            log.warning("no flash kernel could be timed; using %s (first in order)", first)
            return first, {}
        if OUT_OF_TIME not in sel.failed.values():
            store(key, sel, where)
        log.info("attention kernels timed: %s", describe(sel.kernel, sel.timings))
        return sel.kernel, sel.timings

    return pick
