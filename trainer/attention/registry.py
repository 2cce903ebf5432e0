"""The attention backends, one entry each: the one table the worker, the preflight probe, the
per-node cache key and the import guard read. Adding a backend is one ``register`` call here
(docs/architecture-attention.md). Imports no torch: the import guard and the probe read it first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from trainer import user_cache

AttnFn = Callable  # (q, k, v) in (B, nh, T, hs), k/v with nkv heads -> (B, nh, T, hs), causal


@dataclass(frozen=True, kw_only=True)
class Backend:
    name: str
    load: Callable[[], AttnFn]  # the attention function; importing its package may raise
    order: int  # candidates are tried lowest first; the first that passes wins where nothing is timed
    order_on_hopper: Optional[int] = None  # its order from compute capability 9 on, where it differs
    devices: tuple[str, ...] = ("cuda",)
    min_capability: int = 0  # the GPU's major compute capability it needs
    max_head_dim: Optional[int] = None
    # The same kernel with K and V repeated, for a device where its native GQA is refused.
    repeat_kv: Optional[Callable[[], AttnFn]] = None
    distribution: Optional[str] = None  # its pip distribution, if a package of its own
    module: Optional[str] = None  # what ``load`` imports: the probe tries it in a child first
    blocked: tuple[str, ...] = ()  # more modules of its package, refused by the import guard
    versioned: tuple[str, ...] = ()  # more distributions whose version changes its speed


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def candidates(device_type: str, capability: int = 0) -> list[str]:
    """The flash candidates on a device (``capability``: a GPU's major compute capability), in order."""
    hopper = device_type == "cuda" and capability >= 9
    fits = [b for b in BACKENDS.values() if device_type in b.devices
            and (device_type != "cuda" or capability >= b.min_capability)]
    return [b.name for b in sorted(fits, key=lambda b: b.order_on_hopper if hopper and b.order_on_hopper
                                   is not None else b.order)]


def packaged() -> list[Backend]:
    """The backends that import a package of their own: what the probe imports in a child first."""
    return [b for b in BACKENDS.values() if b.module]


def distributions() -> list[str]:
    return [b.distribution for b in packaged() if b.distribution]


def versioned_distributions() -> list[str]:
    """Distributions whose version changes a kernel's speed (a new one means timing again)."""
    return sorted({*distributions(), *(d for b in BACKENDS.values() for d in b.versioned), "torchao"})


def blocked_modules() -> list[str]:
    """What the import guard refuses where flash attention is off: each package's top-level
    module and the others it names."""
    return sorted({m for b in packaged() for m in (b.module.split(".")[0], *b.blocked)})


# ---------------------------------------------------------------- the backends


# Loaders import torch only when they run.
def _sdpa(kernel: str, native_gqa: bool = True) -> Callable[[], AttnFn]:
    def load() -> AttnFn:
        from trainer.attention import kernels

        return kernels.sdpa(kernel, native_gqa)

    return load


def _flash_attn_func(module: str) -> Callable[[], AttnFn]:
    def load() -> AttnFn:
        from trainer.attention import kernels

        return kernels.flash_attn_func(module)

    return load


# FA4 JIT-compiles its kernels on first use (seconds: docs/preflight.md); its on-disk cache keeps them
# for the next process and the next run, in the user's cache (trainer/user_cache.py).
CUTE_CACHE_NAME = "flash-attention-cute-dsl"


def enable_fa4_disk_cache(environ=os.environ) -> None:
    """Switch FA4's kernel cache on (unless the user set it); must run before its import."""
    environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(user_cache.root(environ) / CUTE_CACHE_NAME))


def _fa4() -> AttnFn:
    enable_fa4_disk_cache()
    from trainer.attention import flash_op

    return flash_op.fa4()


_CUDNN = ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13")
register(Backend(name="sdpa_flash_cpu", load=_sdpa("FLASH_ATTENTION"),
                 repeat_kv=_sdpa("FLASH_ATTENTION", False), order=0, devices=("cpu",)))
register(Backend(name="flash_attn_3", load=_flash_attn_func("flash_attn_interface"), order=10,
                 min_capability=9, max_head_dim=256, distribution="flash-attn-3", module="flash_attn_interface",
                 blocked=("flash_attn_3", "flash_attn_3_cuda", "hopper.flash_attn")))  # hopper: FA3's source tree
register(Backend(name="flash_attn_4", load=_fa4, order=20, min_capability=9, distribution="flash-attn-4",
                 module="flash_attn.cute", blocked=("flash_attn_4",), versioned=("nvidia-cutlass-dsl",)))
# On Hopper cuDNN's fused attention beats FlashAttention-2 (docs/BENCHMARKS.md), so it goes before FA2 there.
register(Backend(name="sdpa_cudnn", load=_sdpa("CUDNN_ATTENTION"),
                 repeat_kv=_sdpa("CUDNN_ATTENTION", False), order=55, order_on_hopper=30, versioned=_CUDNN))
# flash-attn-4 alone installs a `flash_attn` namespace holding only `cute`: FA2 is absent there, not broken.
register(Backend(name="flash_attn_2", load=_flash_attn_func("flash_attn"), order=40, max_head_dim=256,
                 distribution="flash-attn", module="flash_attn", blocked=("flash_attn_2_cuda", "flash_attn_cuda")))
register(Backend(name="sdpa_flash", load=_sdpa("FLASH_ATTENTION"),
                 repeat_kv=_sdpa("FLASH_ATTENTION", False), order=50, max_head_dim=256))
register(Backend(name="sdpa_efficient", load=_sdpa("EFFICIENT_ATTENTION"),
                 repeat_kv=_sdpa("EFFICIENT_ATTENTION", False), order=60))
