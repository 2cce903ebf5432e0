"""A persistent compile cache per user and node, so a second run of the same shapes skips most
of ``torch.compile``.

Inductor's FX-graph and AOT-autograd caches are on by default, but under
``/tmp/torchinductor_<user>``, which a reboot or a tmp cleaner empties; they go to
``~/.cache/flash-orchestrator/inductor`` instead (``TORCHINDUCTOR_CACHE_DIR`` set by the user
wins; importing ``torch._inductor`` sets it to that default, which is no one's choice). On top, PyTorch's portable "mega-cache" (``torch.compiler.save_cache_artifacts``, in
torch 2.7 and later) is saved after the first compiled step and loaded before the next run's
first one: one file holding every artifact of that compile, which also fills a cache emptied
since, or one on another machine the file is copied to.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Mapping, MutableMapping, Optional

import torch

from trainer import atomic_write
from trainer import user_cache

log = logging.getLogger(__name__)

INDUCTOR_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Switches a user may have turned off on purpose: set only where unset.
CACHE_SWITCHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def _chosen_dir(env: Mapping[str, str]) -> Optional[str]:
    """``TORCHINDUCTOR_CACHE_DIR`` unless unset or torch's own default, which its import writes there."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = env.get(INDUCTOR_DIR_ENV)
    return value if value and os.path.abspath(value) != os.path.abspath(default_cache_dir()) else None


def inductor_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if environ is None else environ
    chosen = _chosen_dir(env)
    return Path(chosen) if chosen else user_cache.root(env) / "inductor"


def enable(environ: Optional[MutableMapping[str, str]] = None) -> Path:
    """Point Inductor's caches at the persistent directory (before the first compile); returns it."""
    env = os.environ if environ is None else environ
    directory = inductor_dir(env)
    env[INDUCTOR_DIR_ENV] = str(directory)  # read by Inductor at each compile, not only at import
    for name, value in CACHE_SWITCHES.items():
        env.setdefault(name, value)
    return directory


def artifacts_path(signature: str, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The mega-cache file of one compiled program: torch build and ``signature`` (model, shapes)."""
    digest = hashlib.sha256(f"{torch.__version__}\0{signature}".encode()).hexdigest()[:24]
    return inductor_dir(environ) / "artifacts" / f"{digest}.bin"


def load_artifacts(path: Path) -> bool:
    """Fill the local caches from a saved mega-cache; a missing or bad file only means a full compile."""
    if not path.is_file() or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    try:
        # None (after torch's own warning) for bytes it cannot read.
        loaded = torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    except Exception as e:  # a file from another torch build, or cut short: compile as without it
        log.warning("compile cache %s not loaded (%s: %s)", path, type(e).__name__, e)
        return False
    if not loaded:
        log.warning("compile cache %s not loaded (unreadable); compiling in full", path)
    return loaded


def save_artifacts(path: Path) -> bool:
    """Save what this process compiled so far; atomic, so concurrent workers leave one whole file."""
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return False
    try:
        saved = torch.compiler.save_cache_artifacts()
        if not saved:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write.write_bytes(path, saved[0])
    except Exception as e:  # the run goes on; the next one compiles again
        log.warning("compile cache %s not saved (%s: %s)", path, type(e).__name__, e)
        return False
    return True
