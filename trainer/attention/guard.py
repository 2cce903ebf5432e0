"""Blocks flash-attn imports in a process where flash attention is disabled.

A broken flash-attn wheel (wrong GLIBC, torch ABI, CUDA runtime) can crash or poison any
process that imports it, and third-party code (transformers, xformers, ...) imports it on its
own. With the guard installed, every flash-attn module raises a clear ImportError instead.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

from trainer.attention import registry  # the backends' modules; imports no torch

# Why a node or worker has no flash attention when it was switched off, in every report.
DISABLED_REASON = "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"


def is_blocked(fullname: str) -> bool:
    return any(fullname == p or fullname.startswith(p + ".") for p in registry.blocked_modules())


def disabled_by_env(environ: os._Environ | dict | None = None) -> bool:
    """The variable our users' scripts already check: DISABLE_FLASH_ATTN=1 (also true/yes)."""
    env = os.environ if environ is None else environ
    return str(env.get("DISABLE_FLASH_ATTN", "")).strip().lower() in ("1", "true", "yes", "on")


class FlashAttnBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if is_blocked(fullname):
            raise ImportError(
                f"import of {fullname!r} blocked: flash attention is disabled in this process "
                "(DISABLE_FLASH_ATTN=1); the standard attention implementation is used instead",
                name=fullname,
            )
        return None


def install() -> bool:
    """Install the blocker first on sys.meta_path; returns True if it was newly installed.

    Modules already imported are dropped from sys.modules so a later import also fails.
    """
    for name in [m for m in sys.modules if is_blocked(m)]:
        del sys.modules[name]
    if any(isinstance(f, FlashAttnBlocker) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, FlashAttnBlocker())
    return True


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, FlashAttnBlocker)]


def installed() -> bool:
    return any(isinstance(f, FlashAttnBlocker) for f in sys.meta_path)
