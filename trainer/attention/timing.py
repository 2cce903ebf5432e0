"""Timing the kernels that passed their check, at the run's real shape, as the training step runs them.

A fixed kernel order lies (docs/architecture-attention.md, "Measured"). So every kernel that passed its correctness check
is timed forward+backward inside the model's own transformer blocks (norms, attention with its
projections and rotary, SwiGLU MLP, residuals; each block ``torch.compile``d and checkpointed
as training does it), stacked as the model stacks them, at the run's micro-batch, sequence
length, heads, KV heads, head dim, MLP width and dtype, and the fastest wins. The decision
(``fastest``) is pure, and the timer is injectable.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from trainer import timing
from trainer.attention.shape import AttentionShape
from trainer.model import AttnFn

log = logging.getLogger(__name__)

# (kernel name, attention function) -> ms per forward+backward iteration; raises when it cannot run.
Timer = Callable[[str, AttnFn], float]


# Standard attention is timed too, on a GPU, where the whole model's attention scores fit in this
# share of its memory: at short sequences it can beat the fused kernels; above, the scores
# outgrow the GPU before speed matters (docs/architecture-attention.md, "Measured").
STANDARD_SCORES_SHARE = 0.10
SCORE_BYTES_PER_ELEMENT = 6  # the bf16 probabilities kept for backward and the fp32 softmax


def standard_scores_bytes(shape: AttentionShape) -> int:
    """Bytes of attention scores standard attention keeps for backward across the model."""
    return shape.n_layers * shape.micro_batch * shape.n_heads * shape.seq_len ** 2 * SCORE_BYTES_PER_ELEMENT


def times_standard(shape: AttentionShape, device_bytes: Optional[int]) -> bool:
    """Whether standard attention joins the timed candidates (``device_bytes``: the GPU's memory;
    None on a CPU, where the one fused candidate needs no timing)."""
    return device_bytes is not None and standard_scores_bytes(shape) <= STANDARD_SCORES_SHARE * device_bytes


@dataclass
class Selection:
    kernel: Optional[str]  # None when no candidate could be timed
    timings: dict[str, float] = field(default_factory=dict)  # kernel -> ms per iteration
    failed: dict[str, str] = field(default_factory=dict)  # kernel -> why it could not be timed


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
        began = time.monotonic()
        try:
            sel.timings[name] = float(timer(name, fn))
            log.info("kernel %s: %.3g ms/iter, timed in %.1f s", name, sel.timings[name], time.monotonic() - began)
        except Exception as e:  # a kernel that fails at the real shape (memory, launch) is not a choice
            sel.failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("kernel %s could not be timed: %s", name, sel.failed[name])
    if sel.timings:
        sel.kernel = min(sel.timings, key=sel.timings.get)
    return sel


def describe(kernel: str, timings: dict[str, float]) -> str:
    """'kernel X (Y ms/iter), runner-up Z (W ms)', or just the kernel when nothing was timed."""
    if kernel not in timings:
        return f"kernel {kernel}"
    what = "standard attention, timed fastest" if kernel == "standard" else f"kernel {kernel}"
    text = f"{what} ({timings[kernel]:.3g} ms/iter)"
    others = {k: ms for k, ms in timings.items() if k != kernel}
    second = min(others, key=others.get) if others else None
    return text + (f", runner-up {second} ({timings[second]:.3g} ms)" if second else "")


# ---------------------------------------------------------------- timing in the model's blocks


# Iterations run back to back in one timed group, so the CPU runs ahead of the GPU as it does in
# training, rather than each waiting for the one before.
GROUP_S = 0.02
MAX_GROUP = 64


def group_size(seconds_per_iteration: float) -> int:
    """Iterations per timed group: about GROUP_S of GPU work, at least one."""
    return timing.group_size(seconds_per_iteration, GROUP_S, MAX_GROUP)


# How many whole blocks a timing stacks (at most): two include one block's output feeding the
# next, as in the model; deeper stacks ranked alike and cost more (docs/architecture-attention.md).
MAX_TIMED_BLOCKS = 2


def timed_blocks(shape: AttentionShape) -> int:
    """How many blocks ``block_timer`` stacks: one attention block without an MLP width, else the
    model's layers up to MAX_TIMED_BLOCKS."""
    return 1 if not shape.ffn_hidden else max(1, min(shape.n_layers, MAX_TIMED_BLOCKS))


def block_timer(shape: AttentionShape, device: torch.device, *, warmup: int = 3, iters: int = 10,
                depth: Optional[int] = None, cudagraphs: Optional[bool] = None) -> Timer:
    """Forward+backward with the candidate kernel, median ms per iteration over ``iters`` groups
    of iterations queued back to back (``group_size``): of ``depth`` whole transformer blocks
    (default ``timed_blocks``), each compiled on its own as training compiles them and
    checkpointed where training checkpoints it, or of one attention block where the shape has
    no MLP width. Under CUDA graphs (``cudagraphs``; by default where ``shape.replays``) the
    blocks compile together, as one graph replayed as CUDA graphs, as the whole model compiles then (``trainer.compile_mode.whole_model``), and
    every iteration starts a new graph step, as a training step does (``trainer.step.Stepper``)."""
    from trainer import compile_mode
    from trainer.model import Attention, Block, ModelArgs, rotary_tables
    from trainer.model_args import checkpointed

    dtype = torch.bfloat16 if shape.precision(device.type) == "bf16" else torch.float32
    compiled = shape.compiles(device.type)
    cudagraphs = shape.replays(device.type) if cudagraphs is None else cudagraphs
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
        if compiled and cudagraphs:  # one graph, as trainer.parallelize.compile_whole compiles
            stack = _Stack(blocks)
            stack.compile(dynamic=False)
            return [stack]
        for block in blocks:
            if compiled:
                block.compile(dynamic=False)  # as trainer.parallelize.compile_blocks does
        return blocks

    def time_ms(name: str, fn: AttnFn) -> float:
        if compiled:  # each kernel's graphs anew: dynamo's recompile limit must not turn one eager
            torch._dynamo.reset()
        # The run's random state is left as it was: a worker may time after building its model.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            # The blocks compile lazily, at their first call: the mode holds for the whole timing.
            with compile_mode.using(compile_mode.CUDA_GRAPHS if cudagraphs else "default"):
                return timed(fn)

    def timed(fn: AttnFn) -> float:
        blocks = build(fn)
        # As in training: fp32 weights, the step under autocast.
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        x = torch.randn(shape.micro_batch, shape.seq_len, dim, device=device, requires_grad=True)
        dy = torch.randn(shape.micro_batch, shape.seq_len, dim, device=device)

        params = [p for block in blocks for p in block.parameters()]

        def step():
            if cudagraphs:
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
    """The GPU's memory in bytes (``times_standard``'s ``device_bytes``); None off a GPU."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
