"""Gather one node's facts, in a child process: ``python -m orchestrator.preflight.probe``.

Run as a child because a broken flash-attn ``.so`` can crash (or hang) whoever imports it. Each
flash-attn import is tried in a grandchild of its own, so even a segfaulting import is reported
with its signal while every other check still runs; each check is reported on its own, also on
nodes without a GPU. The facts are plain JSON (the schema is ``gather``'s return value), printed
as one line after ``MARKER`` so libraries that print to stdout cannot garble them.

Where kernels that passed are then timed at the run's shape (seconds of compiles on a GPU), the
facts are printed twice: first before the timing, with ``kernel_selection`` ``{"deferred": true}``,
then complete. The last line is the result; a reader that needs only the verdict (the plan) may
go on at the first (``child.run_probe``'s ``on_facts``), while the timing finishes beside it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import psutil

from orchestrator.preflight import health
from orchestrator.preflight.health import MARKER, nvml_text
from orchestrator.preflight.settings import ProbeSettings
from trainer.attention import guard  # installs the guard when DISABLE_FLASH_ATTN=1 is in the env
from trainer.attention import registry
from trainer.attention.cache import glibc_version
from trainer.attention.shape import AttentionShape

SCHEMA = 1
# Exit 3: the module imports but has no flash_attn_func. flash-attn-4 alone installs a
# ``flash_attn`` namespace holding only ``cute``: FA2 is absent there, not broken.
# The child prints the import's seconds: read later, the import's end would not be known.
_IMPORT_SNIPPET = ("import importlib, sys, time; t = time.monotonic(); m = importlib.import_module(sys.argv[1]); "
                   "print(round(time.monotonic() - t, 3)); sys.exit(0 if hasattr(m, 'flash_attn_func') else 3)")
_NO_FLASH_ATTN_FUNC = 3
_TAIL_LINES = 25


def tail(text: str, n: int = _TAIL_LINES) -> str:
    """The last ``n`` lines: where a traceback says what went wrong."""
    return "\n".join(text.strip().splitlines()[-n:])


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


# ---------------------------------------------------------------- system


def loaded_libstdcxx() -> dict:
    """The libstdc++ this process loaded (torch pulls it in) and the GLIBCXX it provides."""
    from orchestrator.preflight import elf

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as e:
        return {"error": _error_text(e)}
    paths = sorted({line.split()[-1] for line in maps.splitlines() if "libstdc++.so" in line})
    if not paths:
        return {"error": "libstdc++ is not loaded in this process"}
    try:
        return {"path": paths[0], **elf.provided_versions(paths[0])}
    except (OSError, ValueError) as e:
        return {"path": paths[0], "error": _error_text(e)}


def torch_facts() -> dict:
    try:
        import torch
    except Exception as e:  # a broken torch install is a fact to report, not a crash
        return {"error": _error_text(e)}
    out = {"version": torch.__version__, "cuda": torch.version.cuda,
           "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["cuda_available"] = torch.cuda.is_available()
    # torch warns (and returns False) when the driver is too old for its CUDA runtime.
    msgs = [str(w.message) for w in caught if "CUDA" in str(w.message) or "driver" in str(w.message)]
    if msgs:
        out["cuda_error"] = msgs[0]
    return out


def gpu_facts(torch_ok: bool) -> tuple[dict, list[dict]]:
    """(driver, gpus): NVML first (it sees the driver even when torch cannot), then torch."""
    driver: dict = {"version": None, "cuda": None, "source": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver.update(version=nvml_text(pynvml.nvmlSystemGetDriverVersion()), source="nvml")
            cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12040
            driver["cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                gpus.append({"index": i, "name": nvml_text(pynvml.nvmlDeviceGetName(h)),
                             "capability": f"{major}.{minor}", "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)})
            return driver, gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # no NVML library (CPU node) or no driver
        driver["error"] = _error_text(e)
    if not torch_ok:
        return driver, []
    import torch

    if not torch.cuda.is_available():
        return driver, []
    driver["source"] = "torch"
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}", "memory_bytes": p.total_memory})
    return driver, gpus


# ---------------------------------------------------------------- flash-attn, without importing it


def flash_distributions() -> list[dict]:
    """Installed flash-attn distributions, their versions and what their .so files require."""
    from orchestrator.preflight import elf

    seen, out = set(), []
    for name in registry.distributions():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        key = (dist.metadata["Name"], dist.version)
        if key in seen:
            continue
        seen.add(key)
        record: dict = {"name": dist.metadata["Name"], "version": dist.version, "so_files": [], "requires": {}}
        for f in dist.files or []:
            if ".so" not in f.name:
                continue
            path = Path(dist.locate_file(f))
            try:
                needs = elf.required_versions(path)
            except (OSError, ValueError) as e:
                record.setdefault("errors", []).append(_error_text(e))
                continue
            record["so_files"].append({"path": str(path), "requires": needs})
            for family, version in needs.items():
                record["requires"][family] = elf.highest([record["requires"].get(family), version])
        out.append(record)
    return out


def _findable(module: str) -> bool:
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)  # for a top-level name this locates without executing
    if spec is None or not rest:
        return spec is not None
    return any((Path(loc) / rest.replace(".", "/")).exists() for loc in spec.submodule_search_locations or [])


def start_import(module: str, timeout_s: float, env: Optional[dict] = None) -> Callable[[], dict]:
    """Start importing ``module`` in a fresh interpreter; the function returned waits for the
    outcome, even if the import segfaults or hangs (killed ``timeout_s`` after the start)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _IMPORT_SNIPPET, module], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)

    def outcome() -> dict:
        out: dict = {"module": module, "ok": False}
        try:
            printed, err = proc.communicate(timeout=max(0.0, timeout_s - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            printed, err = proc.communicate()
            out.update(timed_out=True, error=tail(err or "") or f"import did not finish in {timeout_s:g} s")
        else:
            out["ok"] = proc.returncode == 0
            if proc.returncode < 0:
                name = signal.Signals(-proc.returncode).name
                out.update(signal=name, error=tail(err) or f"killed by {name}")
            elif proc.returncode == _NO_FLASH_ATTN_FUNC:
                out["skipped"] = (f"{module} has no flash_attn_func: a namespace without that kernel "
                                  "(flash-attn-4 alone installs flash_attn.cute only)")
            elif proc.returncode:
                out["error"] = tail(err)
        try:  # the import's own seconds; else (it failed) those until now
            out["seconds"] = float(printed.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out["seconds"] = round(time.monotonic() - started, 3)
        return out

    return outcome


def check_import(module: str, timeout_s: float, env: Optional[dict] = None) -> dict:
    """Import ``module`` in a fresh interpreter: its outcome, even if it segfaults or hangs."""
    return start_import(module, timeout_s, env)()


def start_flash_imports(disabled: bool, timeout_s: float) -> Callable[[], list[dict]]:
    """Start each installed flash-attn package's import check (``start_import``); the function
    returned waits for them. Started first, the imports (seconds each) run beside the probe's
    own work (torch's import, CUDA's start, node health) rather than after it."""
    out: list = []
    for kernel, module in ((b.name, b.module) for b in registry.packaged()):
        if disabled:
            out.append({"module": module, "kernel": kernel, "ok": False,
                        "skipped": "flash attention disabled: not imported"})
            continue
        try:
            findable = _findable(module)
        except (ImportError, ValueError) as e:
            out.append({"module": module, "kernel": kernel, "ok": False, "error": _error_text(e)})
            continue
        if findable:
            outcome = start_import(module, timeout_s)
            out.append(lambda kernel=kernel, outcome=outcome: {"kernel": kernel, **outcome()})
    return lambda: [entry() if callable(entry) else entry for entry in out]


# ---------------------------------------------------------------- kernels


# kernel_selection while the kernels that passed are still being timed (the first of two lines).
DEFERRED = {"deferred": True}


def kernel_checks(settings: argparse.Namespace, imports: list[dict], disabled: bool,
                  before_timing: Optional[Callable[[dict, dict], None]] = None) -> tuple[dict, dict, dict]:
    """(check, kernels, kernel_selection): each flash candidate checked fwd+bwd against standard
    attention, then, given the run's shape, those that passed timed as training runs them
    (``trainer.attention.choose``, as the workers choose; cached on this node where they read
    it; bounded so a slow compile cannot time the probe out). ``before_timing(check, results)``
    is called when the checks are done and timing begins (not when there is nothing to time:
    one candidate, or a choice cached for this node and shape)."""
    import torch

    from trainer.attention import choice

    shape = settings.shape
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    check = {"device": str(device), "dtype": "bfloat16" if shape.precision(device.type) == "bf16" else "float32",
             "head_dim": shape.head_dim, "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads}
    imported = {i["kernel"]: i for i in imports}
    skip = {}
    for name in choice.flash_candidates(device):
        module = registry.BACKENDS[name].module if name in registry.BACKENDS else None
        if disabled:
            skip[name] = guard.DISABLED_REASON
        elif module and name not in imported:
            skip[name] = f"{module} is not installed"
        elif module and not imported[name]["ok"]:
            skip[name] = imported[name].get("skipped") or f"import {module} failed"
    announce = (lambda checks: before_timing(check, checks)) if before_timing is not None else None
    resolved = choice.choose("flash", shape, device, skip=skip, reuse_verdict=False, budget_s=settings.timing_budget,
                             flash_attn_allowed=not disabled, before_timing=announce)
    return check, resolved.checks, resolved.selection


# ---------------------------------------------------------------- all together


def gather(settings: argparse.Namespace, early: Optional[Callable[[dict], None]] = None) -> dict:
    """The node's facts; ``early(facts)`` gets them once more before kernels are timed, with
    ``kernel_selection`` DEFERRED (never when there is nothing to time)."""
    disabled = settings.disable_flash_attn or guard.disabled_by_env()
    if disabled:
        guard.install()
    imports_done = start_flash_imports(disabled, settings.import_timeout)
    facts: dict = {
        "schema": SCHEMA, "hostname": platform.node(), "os": platform.platform(), "arch": platform.machine(),
        "python": platform.python_version(), "glibc": glibc_version(),
    }
    facts["torch"] = torch_facts()
    torch_ok = "error" not in facts["torch"]
    facts["libstdcxx"] = loaded_libstdcxx()
    facts["driver"], facts["gpus"] = gpu_facts(torch_ok)
    facts["health"] = health.gather(torch_ok)  # before the kernels: the plan's early facts need it
    facts["memory_bytes"] = psutil.virtual_memory().total  # the planner's memory check on CPU nodes
    try:
        distributions = flash_distributions()
    except Exception as e:  # unreadable metadata must not hide the other checks
        distributions = [{"name": "flash-attn", "version": None, "error": _error_text(e)}]
    imports = imports_done()
    facts["flash_attn"] = {"disabled": disabled, "distributions": distributions, "imports": imports}
    if torch_ok:
        def announce(check: dict, kernels: dict) -> None:
            early(dict(facts, check=check, kernels=kernels, kernel_selection=DEFERRED))

        facts["check"], facts["kernels"], facts["kernel_selection"] = kernel_checks(
            settings, imports, disabled, announce if early is not None else None)
    else:
        facts["check"], facts["kernels"], facts["kernel_selection"] = {}, {}, {}
    return facts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.preflight.probe", description=__doc__.splitlines()[0])
    d = ProbeSettings()  # the defaults live there
    p.add_argument("--shape", type=AttentionShape.from_json, default=d.shape,
                   help="the attention shape checked, and (with seq_len) timed at, as JSON (AttentionShape)")
    p.add_argument("--timing-budget", type=float, default=60.0, help="seconds for timing kernels; the rest untimed")
    p.add_argument("--disable-flash-attn", action="store_true", help="never import flash-attn")
    p.add_argument("--import-timeout", type=float, default=d.import_timeout_s, help="seconds per flash-attn import")
    return p


def main(argv: list[str] | None = None) -> int:
    settings = build_parser().parse_args(argv)
    return health.print_facts(lambda emit: gather(settings, early=emit))


if __name__ == "__main__":
    sys.exit(main())
