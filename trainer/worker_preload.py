"""The imports a training worker needs, started in a thread the moment its process starts.

Ray Train brings each worker's process up, then spends seconds on its own setup (the worker
actor, the worker group, the torch process group) before the train function is unpickled,
which imports the training loop and torch. Ray runs ``start`` first thing in the process
(``ray_internals.WORKER_SETUP_HOOK_ENV``, set in the workers' environment by
``orchestrator/launch.py``), so those imports overlap Ray's setup instead of following it.

Nothing here may fail the worker: Ray ends a process whose setup hook raises, so the hook only
starts a thread, and a failed import is left for the train function to meet and report.
"""

from __future__ import annotations

import importlib
import threading
import time

MODULES = ("torch", "trainer.loop")
HOOK = f"{__name__}.start"  # what Ray's setup-hook variable names
finished_at: float | None = None  # epoch seconds the imports ended (None: not started or failed)


def _import() -> None:
    global finished_at
    try:
        for name in MODULES:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - the train function's own import reports it
        return
    finished_at = time.time()


def start() -> None:
    """The worker process setup hook: import MODULES in a daemon thread and return at once."""
    threading.Thread(target=_import, name="worker-preload", daemon=True).start()
