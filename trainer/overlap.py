"""The worker's attention check beside its model build (``trainer/loop.py``).

The check's first CUDA work (cuDNN's start: seconds, docs/startup.md, "Overlap") runs in a
thread while the model is allocated and initialised here. The build waits until the
node's verdict is looked up (the preflight may still be timing kernels on the GPU), and any
timing in the check waits for the build: neither disturbs a timing.

Under CUDA graphs (``train.compile_mode: reduce-overhead``) the check runs here instead, before
the build. Inductor keeps its CUDA-graph trees per thread, and older torch releases fail an
assertion in a thread that did not set that state up; graphs recorded by a timing in a helper
thread must not be the first the process records.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

R = TypeVar("R")
B = TypeVar("B")


def resolve_beside_build(resolve: Callable[[], R], build: Callable[[], B], *, looked_up: threading.Event,
                         built: threading.Event, beside: bool) -> tuple[R, B]:
    """(``resolve()``, ``build()``). ``resolve`` sets ``looked_up`` once the node's verdict is
    looked up, and waits for ``built`` before timing anything. With ``beside``, it runs in a
    thread while ``build`` runs here after ``looked_up``; without, it runs here, then ``build``."""
    if not beside:
        built.set()  # nothing to wait for: the build comes after the check
        checked = resolve()
        return checked, build()
    with ThreadPoolExecutor(1, thread_name_prefix="attention") as pool:
        resolving = pool.submit(resolve)
        looked_up.wait()
        try:
            made = build()
        finally:
            built.set()
        return resolving.result(), made
