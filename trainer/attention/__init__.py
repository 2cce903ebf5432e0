"""Attention: which kernel a worker runs, chosen in one place.

kernels (the functions, the correctness check) -> registry (one entry per backend, loading its
function) -> timing (in the model's own blocks, at the run's shape) -> cache (per node, under one
key) -> choice: a kernel by name, checked here, and ``choose``, what the preflight probe and the
worker both call. The shape that keys it all is
``AttentionShape``. See docs/architecture-attention.md.

The names below load on first use: the import guard and the probe child read the registry
before torch may be imported.
"""

import importlib

# In the run directory: why each node and worker has the kernel it has.
LOG_FILE = "flash_attention_log.txt"
_EXPORTS = {"AttentionShape": "shape", "Backend": "registry", "register": "registry", "BACKENDS": "registry",
            "choose": "choice", "Resolved": "choice", "IMPLS": "choice",
            "standard_attention": "kernels", "unresolved": "kernels", "kernel_fn": "choice", "kernel_names": "choice",
            "check_kernel": "kernels", "checked_fn": "choice", "flash_candidates": "choice", "describe": "timing"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
