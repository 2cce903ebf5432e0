"""A bytecode cache for the processes a local run starts, where the environment keeps none.

Why and when, with the figures: docs/startup.md, "Bytecode". The cache is the orchestrator's own
(``PYTHONPYCACHEPREFIX``), never the installed packages, which ``PYTHONDONTWRITEBYTECODE`` is
usually set to protect. The settings go into this process's environment before it starts Ray,
the probe or a kept head, so every process of the run inherits them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, MutableMapping, Optional

from trainer import user_cache

log = logging.getLogger(__name__)

BYTECODE_ENV = "FLASH_ORCHESTRATOR_BYTECODE_CACHE"  # 0: off; a path: the cache's directory
NO_WRITE_ENV = "PYTHONDONTWRITEBYTECODE"
PREFIX_ENV = "PYTHONPYCACHEPREFIX"


def has_bytecode(package: str = "torch") -> bool:
    """Whether ``package`` was installed with its bytecode (its ``__init__``'s, as the sign), found
    without importing it. A package that is not installed has nothing to compile here."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return True
    source = Path(spec.origin)
    return (source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}.pyc").is_file()


def settings(environ: Mapping[str, str], *, bytecode_installed: bool, default_dir: Path) -> dict[str, str]:
    """The variables a local run's processes need (none when nothing is to be gained): bytecode
    writing on, into a prefix directory of our own."""
    choice = environ.get(BYTECODE_ENV, "")
    if choice == "0" or not environ.get(NO_WRITE_ENV) or environ.get(PREFIX_ENV) or bytecode_installed:
        return {}
    # Absolute: each process resolves the prefix against its own working directory.
    return {NO_WRITE_ENV: "", PREFIX_ENV: os.path.abspath(os.path.expanduser(choice)) if choice else str(default_dir)}


def apply(environ: Optional[MutableMapping[str, str]] = None, package: str = "torch") -> dict[str, str]:
    """Decide by ``package``, and set the variables for the processes this one starts and the
    equivalent for itself (``sys.dont_write_bytecode``, ``sys.pycache_prefix``). Returns what
    was set, which Ray Train's workers get too (a kept head started before passes them none)."""
    env = os.environ if environ is None else environ
    chosen = settings(env, bytecode_installed=has_bytecode(package), default_dir=user_cache.root(env) / "pycache")
    if chosen:
        env.update(chosen)
        sys.dont_write_bytecode = False
        sys.pycache_prefix = chosen[PREFIX_ENV]
        log.info("%s has no compiled bytecode and %s is set: this run's processes keep theirs in %s "
                 "(%s=0 turns this off)", package, NO_WRITE_ENV, chosen[PREFIX_ENV], BYTECODE_ENV)
    return chosen

