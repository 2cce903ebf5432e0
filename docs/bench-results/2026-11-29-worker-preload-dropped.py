# Dropped (2026-11-29, call p2): the workers' setup hook as it was measured; it lived in trainer/worker_preload.py,
# named by orchestrator/launch.py in __RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR. See docs/BENCHMARKS.md, 2026-11-29 02:39 UTC.
"""The imports a training worker needs, started in a thread the moment its process starts.

Ray Train brings each worker's process up, then spends seconds on its own setup (the worker
actor, the worker group, the torch process group) before the train function runs. The
function's own setup then imports what no part of Ray Train does: TorchDynamo, which the model's
build on the meta device already loads (``normal_`` on meta goes through ``torch._refs``), and
Inductor, which ``torch.compile`` loads. On one H200 those took 2.4-2.8 s and 3.5-4.5 s of the
build (``docs/BENCHMARKS.md``, 2026-11-29). Ray runs ``start`` first thing in the process
(``ray_internals.WORKER_SETUP_HOOK_ENV``, set in the workers' environment by
``orchestrator/launch.py``), so these imports overlap Ray's setup instead of following it.

The modules come from ``MODULES_ENV``, which the driver sets per variant (``modules``): Inductor
only where the variant compiles. Nothing imported here may touch CUDA: Ray sets a worker's
``CUDA_VISIBLE_DEVICES`` when its actor is created, after this hook, and the CUDA driver reads
it once, at its first use (``tests/test_gpu_preload.py`` checks it is still uninitialised).

Nothing here may fail the worker: Ray ends a process whose setup hook raises, so the hook only
starts a thread, and a failed import is left for the train function to meet and report.
"""

from __future__ import annotations

import importlib
import os
import threading
import time

HOOK = f"{__name__}.start"  # what Ray's setup-hook variable names
MODULES_ENV = "FLASH_ORCHESTRATOR_PRELOAD_MODULES"  # comma-separated, in import order
BASE = ("torch", "torch._dynamo", "trainer.loop")  # every worker: the loop, and the meta build's dynamo
COMPILE = ("torch._inductor.compile_fx",)  # what torch.compile loads at the model's build and first step
finished_at: float | None = None  # epoch seconds the imports ended (None: not started, or one failed)


def modules(compiles: bool) -> tuple[str, ...]:
    """What a worker of a variant imports while Ray sets it up."""
    return BASE + (COMPILE if compiles else ())


def _import(names: tuple[str, ...]) -> None:
    global finished_at
    try:
        for name in names:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - the train function's own import reports it
        return
    finished_at = time.time()


def start() -> None:
    """The worker process setup hook: import the listed modules in a daemon thread and return."""
    names = tuple(n for n in os.environ.get(MODULES_ENV, ",".join(BASE)).split(",") if n)
    threading.Thread(target=_import, args=(names,), name="worker-preload", daemon=True).start()
