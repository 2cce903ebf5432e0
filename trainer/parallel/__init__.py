"""How the model is spread over the workers: one module per strategy (``ddp.py``, ``fsdp.py``),
each a ``Strategy``, looked up by name in ``STRATEGIES``. The rest of the code asks the strategy
(``get(name)``) and never compares names. Importable without torch: the driver's config, plan and
memory estimate ask it too; what needs torch imports it where it is used.

Adding a strategy: a module with a ``Strategy`` subclass, an entry in ``STRATEGIES`` and its test.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Literal, Optional

FP32, BF16 = 4, 2


@dataclass(frozen=True)
class StateBytes:
    """One worker's model state at its peak, by part (``orchestrator/memory.py`` adds the rest)."""

    params: int
    grads: int
    optimizer: int
    gathered: int = 0  # unsharded parameters in flight at the start of backward
    reduce: int = 0  # unsharded gradients and their fp32 copy at the end of backward
    step: int = 0  # what the optimizer step adds (the masters' fp32 gradients)
    shard: int = 1  # the optimizer step's temporaries are divided by this
    grads_resident: bool = False  # the gradients never leave (DDP's buckets)


class Strategy:
    """What a parallelism decides; ``ddp.py`` and ``fsdp.py`` say how. Methods that need torch
    import it where they run (the driver imports this module to plan)."""

    name: str
    shards: bool  # each worker holds a shard of every parameter (a checkpoint is DCP either way)

    def weights_dtype(self, precision: str) -> str:
        """``train.param_dtype`` auto at compute ``precision``: fp32 (autocast casts the weights)."""
        return "fp32"

    def compiles_whole(self) -> bool:
        """Whether the whole model may compile as one graph (``compile_mode.whole_model``)."""
        return True

    def refusal(self, train, *, cudagraphs: bool) -> Optional[str]:
        """Why this strategy cannot train ``train`` (a TrainConfig); None: it can."""
        return None

    def no_sync(self, model) -> ContextManager:
        """A context in which backward does not reduce gradients across workers (every micro-step
        of gradient accumulation but the last)."""
        return nullcontext()

    # What each strategy defines:
    # state_bytes(params, block, root, *, world_size, weights) -> StateBytes: one worker's model
    #   state, for ``params`` parameters (``block`` in one block, ``root`` in the embedding,
    #   final norm and head) with ``weights``-byte weights in forward and backward.
    # build(args, attn_fn, *, device, seed, compile, world_size, init_weights=None, float8=None,
    #   whole_graph=False, param_dtype=None) -> (the model to train, the Transformer inside it):
    #   built on the meta device, materialised with the seeded init replayed (trainer/parallelize.py)
    #   or ``init_weights`` (a full state dict) loaded; float8 (a recipe) converts the Linear
    #   layers first; whole_graph compiles the model as one graph where compiles_whole allows.


from trainer.parallel.ddp import DDP  # noqa: E402 - the interface above comes first
from trainer.parallel.fsdp import FSDP  # noqa: E402

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (DDP(), FSDP())}
NAMES: tuple[str, ...] = tuple(STRATEGIES)
Name = Literal[NAMES]  # a config field's type: pydantic checks a name against the registry
# What scaling.strategy auto and a single-process bench take: the whole model on every worker.
DEFAULT = DDP.name


def get(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"strategy {name!r}; expected one of {', '.join(NAMES)}") from None


def weights_dtype(param_dtype: str, strategy: str, precision: str) -> Literal["fp32", "bf16"]:
    """The weights' dtype in forward and backward (``train.param_dtype``; trainer/master_weights.py)
    under ``strategy`` at compute ``precision``: auto is bf16 under fsdp computing in bf16 (FSDP2's
    mixed precision, whose fp32 shards are the masters), else fp32 (autocast casts them)."""
    if param_dtype != "auto":
        return param_dtype  # type: ignore[return-value]
    return get(strategy).weights_dtype(precision)  # type: ignore[return-value]


def sharding(shards: bool) -> str:
    """The strategy that does (not) shard the model."""
    return next(s.name for s in STRATEGIES.values() if s.shards == shards)
