"""``train.compile_mode``: Inductor's options for the compiled blocks.

The blocks are compiled by ``trainer/parallelize.py`` with ``block.compile(dynamic=False)``,
lazily, at the first step; a mode is the set of Inductor options ``torch.compile(mode=...)``
would apply (``torch._inductor.list_mode_options``), set here for the process before that step.
"""

from __future__ import annotations

from contextlib import contextmanager

# The mode whose compiled blocks replay as CUDA graphs (Inductor's ``triton.cudagraphs``): one
# launch per block graph instead of one per kernel, for steps the CPU's launches hold back.
CUDA_GRAPHS = "reduce-overhead"


def uses_cudagraphs(mode: str) -> bool:
    """Whether ``mode``'s compiled blocks run as CUDA graphs (no torch import: the driver asks)."""
    return mode == CUDA_GRAPHS


def replays(mode: str, *, compiled: bool, device_type: str) -> bool:
    """Whether a run's blocks really replay as CUDA graphs: ``mode`` asks for them, the blocks are
    compiled, and they run on a GPU (Inductor records no graph on a CPU). The one rule the
    worker, the probe, the bench and the plan's refusal all apply."""
    return compiled and device_type == "cuda" and uses_cudagraphs(mode)


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
