"""Where this user's caches live on a node: ``$XDG_CACHE_HOME/flash-orchestrator``, or
``~/.cache/flash-orchestrator`` without it. The embedded dataset, Inductor's compile cache, the
bytecode cache and the preflight results each keep a folder there, and each has its own variable
to move it elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional


def root(environ: Optional[Mapping[str, str]] = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flash-orchestrator"
