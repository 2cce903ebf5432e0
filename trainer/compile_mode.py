"""``train.compile_mode``: Inductor's options for the compiled model, and what is compiled.

``trainer/parallelize.py`` compiles lazily, at the first step; a mode is the set of Inductor
options ``torch.compile(mode=...)`` would apply (``torch._inductor.list_mode_options``), set here
for the process before that step. The default modes compile each transformer block on its own
(``compile_blocks``); ``reduce-overhead`` compiles the whole model, embedding to loss, as one
graph (``compile_whole``) and replays it as CUDA graphs.

Why the whole model under graphs: with only the blocks as graphs, the embedding, head, loss and
dynamo's guards on every block call still wait on the CPU (measured: docs/performance.md).
"""

from __future__ import annotations

from contextlib import contextmanager

from trainer import parallel

# The mode whose compiled model replays as CUDA graphs (Inductor's ``triton.cudagraphs``): one
# launch per graph instead of one per kernel, for steps the CPU holds back.
CUDA_GRAPHS = "reduce-overhead"


def uses_cudagraphs(mode: str) -> bool:
    """Whether ``mode``'s compiled model runs as CUDA graphs (no torch import: the driver asks)."""
    return mode == CUDA_GRAPHS


def replays(mode: str, *, compiled: bool, device_type: str) -> bool:
    """Whether a run's model really replays as CUDA graphs: ``mode`` asks for them, the model is
    compiled, and it runs on a GPU (Inductor records no graph on a CPU). The one rule the
    worker, the probe, the bench and the plan's refusal all apply."""
    return compiled and device_type == "cuda" and uses_cudagraphs(mode)


def whole_model(mode: str, strategy: str) -> bool:
    """Whether a run compiles the whole model as one graph rather than each block on its own
    (``trainer.parallelize.compile_whole``): under ``mode`` reduce-overhead, where ``strategy``
    allows it (``Strategy.compiles_whole``: DDP or one worker, not FSDP)."""
    return uses_cudagraphs(mode) and parallel.get(strategy).compiles_whole()


def scope(mode: str, strategy: str, *, compiled: bool) -> "str | None":
    """What a run compiles as one graph, as its record says (``compile_scope``): "model", "block",
    or None when nothing is compiled."""
    return ("model" if whole_model(mode, strategy) else "block") if compiled else None


def options(mode: str) -> dict:
    """The Inductor config values of ``mode`` ({} for default)."""
    import torch._inductor

    return {} if mode == "default" else dict(torch._inductor.list_mode_options(mode))


def set_mode(mode: str) -> dict:
    """Apply ``mode``'s options to this process's Inductor config; returns the values replaced."""
    import torch._inductor.config as inductor_config

    previous = {}
    for key, value in options(mode).items():
        previous[key] = getattr(inductor_config, key)
        setattr(inductor_config, key, value)
    return previous


@contextmanager
def using(mode: str):
    """``mode`` for the duration (the bench compiles several configurations in one process)."""
    previous = set_mode(mode)
    try:
        yield
    finally:
        import torch._inductor.config as inductor_config

        for key, value in previous.items():
            setattr(inductor_config, key, value)
