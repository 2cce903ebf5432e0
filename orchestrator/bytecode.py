"""A bytecode cache for the processes a local run starts, where the environment keeps none.

Python compiles each module it imports and keeps the bytecode beside the source
(``__pycache__``) for the next process. Installers that skip that step (uv by default,
``pip --no-compile``) leave packages without bytecode, and with ``PYTHONDONTWRITEBYTECODE`` set,
as container images often have it, no process ever writes any: every process compiles every
module it imports from source, again: seconds of imports in each of the processes a run starts
(the driver, Ray's, the probe, each worker; the figures are in docs/startup.md, "Bytecode").

So where torch has no bytecode and the environment forbids writing it, a local run's processes
write theirs to a cache of the orchestrator's own (``PYTHONPYCACHEPREFIX``), never into the
installed packages, which is what the variable is usually set to prevent. The settings go into
this process's environment before it starts Ray, the probe or a kept head, so every process of
the run inherits them. Nothing changes where the bytecode exists, where writing is allowed,
where the user set a prefix, or with ``BYTECODE_ENV`` = 0; a path there moves the cache.
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

