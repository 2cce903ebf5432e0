"""The per-node attention cache: one JSON file per node and attention shape, reused while
nothing it depends on has changed (docs/preflight.md, "Reuse").

The probe imports torch and every flash-attn build in child processes and runs each kernel:
seconds to tens of seconds per node, for facts that change only when the node's software does.
So each node keeps, under a key of what they depend on (``node_key``: read from metadata and
``stat`` alone, no torch import), its last good probe result and verdict (``raw``, ``verdict``:
written by the preflight) and the kernels' timed choice (``choice``: written by whoever timed
them, the probe or a worker). A worker whose reused kernel fails marks the entry stale
(``mark_stale``), so the next run probes again.

One JSON file per key under ``<cache dir>/<hostname>/``: per node even where home directories
are shared over NFS. Writes go to a temp file renamed into place, so concurrent runs on a node
never see half a file; a file that cannot be read is ignored with a warning.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

from trainer import atomic_write, user_cache
from trainer.attention import guard, registry
from trainer.attention.shape import AttentionShape

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "FLASH_ORCHESTRATOR_PREFLIGHT_CACHE"  # overrides the location (tests, shared homes)
FORMAT = 2
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# The code that checks and times: a change must not be answered from an older result. Read, not
# imported: the probe is the driver's code, this package the worker's.
_CODE = ("orchestrator/preflight/probe.py", "orchestrator/preflight/child.py", "orchestrator/preflight/elf.py",
         *sorted(str(p.relative_to(_PACKAGE_ROOT)) for p in Path(__file__).parent.glob("*.py")))
_LIBSTDCXX_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                   "/lib/x86_64-linux-gnu", "/lib64")


def cache_dir(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Where this user's attention cache lives on this node."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_DIR_ENV):
        return Path(env[CACHE_DIR_ENV])
    return user_cache.root(env) / "preflight"


# ---------------------------------------------------------------- the key, without importing torch


def _stat(path: str | Path) -> Optional[list]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [str(path), st.st_size, st.st_mtime_ns]


def _code_digest() -> str:
    # Contents, not paths or mtimes: `ray job submit` unpacks the same code into a new directory per job.
    h = hashlib.sha256()
    for rel in _CODE:
        try:
            h.update((_PACKAGE_ROOT / rel).read_bytes())
        except OSError:
            h.update(f"missing {rel}".encode())
    return h.hexdigest()[:16]


def _read(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def _search_path(env: Mapping[str, str]) -> list[str]:
    # The probe child runs with the node's PYTHONPATH in front (child.probe_env): look where it looks.
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return extra + [p for p in sys.path if p not in extra]


def _distribution(name: str, path: list[str]) -> Optional[dict]:
    dist = next(iter(importlib.metadata.distributions(name=name, path=path)), None)
    if dist is None:
        return None
    record = {"name": dist.metadata["Name"], "version": dist.version, "at": str(dist.locate_file(""))}
    files = [f for f in dist.files or [] if ".so" in f.name]
    record["so_files"] = [[f.name, *(_stat(dist.locate_file(f)) or [None, None, None])[1:]] for f in files]
    return record


def _gpus() -> list[str]:
    # The driver publishes one file per GPU (model, bus, ...): readable without NVML or CUDA.
    return [_read(p) or "" for p in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information"))]


def _libstdcxx(env: Mapping[str, str]) -> list:
    dirs = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    dirs += [os.path.join(sys.prefix, "lib"), *_LIBSTDCXX_DIRS]
    seen = []
    for d in dirs:
        real = os.path.realpath(os.path.join(d, "libstdc++.so.6"))
        if os.path.exists(real) and real not in [s[0] for s in seen]:
            seen.append(_stat(real))
    return seen


def _module_origin(module: str, path: list[str]) -> Optional[list]:
    """Where a top-level flash module would be imported from (also a package without dist-info)."""
    for entry in path:
        for candidate in (Path(entry) / module / "__init__.py", *Path(entry).glob(f"{module}.*.so"),
                          Path(entry) / f"{module}.py"):
            if candidate.is_file():
                return _stat(candidate)
    return None


def glibc_version() -> Optional[str]:
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION")  # 'glibc 2.35'; absent on musl and macOS
    except (ValueError, OSError, AttributeError):
        return None
    return value.split()[-1] if value else None


def node_key(shape: AttentionShape, disabled: bool, environ: Optional[Mapping[str, str]] = None) -> dict:
    """What a probe result and a kernel timing on this node depend on, as plain JSON; ``disabled``:
    flash attention switched off by flag (the node's own DISABLE_FLASH_ATTN counts too)."""
    env = os.environ if environ is None else environ
    return {**node_facts(env), "shape": asdict(shape), "disabled": bool(disabled or guard.disabled_by_env(env))}


def node_facts(env: Mapping[str, str]) -> dict:
    """This node's software and GPUs, and the code that checks and times."""
    path = _search_path(env)
    torch_dist = next(iter(importlib.metadata.distributions(name="torch", path=path)), None)
    return {
        "format": FORMAT, "hostname": platform.node(), "code": _code_digest(),
        "python": [sys.executable, platform.python_version()],
        "driver": _read("/sys/module/nvidia/version") or _read("/proc/driver/nvidia/version"),
        # Not CUDA_VISIBLE_DEVICES: the probe task and the workers see different masks of the same GPUs.
        "gpus": _gpus(),
        "torch": [torch_dist.version, _stat(Path(str(torch_dist.locate_file(""))) / "torch" / "version.py")]
        if torch_dist else None,
        "glibc": glibc_version(), "libstdcxx": _libstdcxx(env),
        "distributions": [d for d in (_distribution(n, path) for n in registry.versioned_distributions()) if d],
        "modules": {m: _module_origin(m, path) for m in sorted({b.module.split(".")[0] for b in registry.packaged()})},
    }


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def entry_path(key: dict, environ: Optional[Mapping[str, str]] = None) -> Path:
    return cache_dir(environ) / platform.node() / f"{digest(key)}.json"


def path_for(shape: AttentionShape, disabled: bool, environ: Optional[Mapping[str, str]] = None) -> Path:
    return entry_path(node_key(shape, disabled, environ), environ)


# ---------------------------------------------------------------- entries


@dataclass
class Lookup:
    """What the cache held for a key: a usable entry, or why there is none (for the output)."""

    path: Path
    entry: Optional[dict]
    why_not: Optional[str]  # None when ``entry`` is reused


def _read_entry(path: Path) -> tuple[Optional[dict], str]:
    """(the entry, stale or not, or None and why): a corrupt file is a miss, with a warning."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None, "no cached result for this node's current state"
    except OSError as e:
        log.warning("ignoring the kernel cache file %s: it is unreadable (%s)", path, e)
        return None, f"cache unreadable: {e}"
    try:
        entry = json.loads(text)  # garbage bytes raise UnicodeDecodeError, a ValueError
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            raise ValueError("not a preflight cache entry")
    except ValueError as e:
        log.warning("ignoring the kernel cache file %s: it is corrupt (%s)", path, e)
        return None, "cache corrupt"
    return entry, ""


def load(path: Path) -> Lookup:
    """The entry at ``path``; a missing, stale or unreadable one is a miss (never an error)."""
    entry, why = _read_entry(path)
    if entry is not None and entry.get("stale"):
        return Lookup(path, None, f"cached result marked stale: {entry['stale']}")
    return Lookup(path, entry, why or None)


def probe_result(found: Lookup) -> Optional[dict]:
    """The entry's probe output (``raw``), where the preflight wrote one."""
    raw = (found.entry or {}).get("raw")
    return raw if isinstance(raw, dict) else None


def _write(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write.write_json(path, entry, indent=None)  # a concurrent reader sees the old file or the new one


def _update(path: Path, **fields) -> None:
    try:
        _write(path, {**(_read_entry(path)[0] or {}), "format": FORMAT, **fields})
    except OSError as e:  # a read-only or full home only costs the next run a probe
        log.warning("could not write the preflight cache %s (%s)", path, e)


def store(path: Path, key: dict, raw: dict, verdict: dict) -> None:
    """Keep a good probe result (``raw``: run_probe's output) and its flash verdict for reuse."""
    _update(path, created=time.time(), key=key, raw=raw, verdict=verdict, stale=None)


def choice(path: Path) -> tuple[Optional[str], dict]:
    """(kernel, {kernel: ms}) timed on this node at this shape, or (None, {})."""
    entry, _ = _read_entry(path)
    timed = (entry or {}).get("choice") or {}
    try:
        timings = {str(k): float(v) for k, v in timed["timings"].items()}
        kernel = str(timed["kernel"])
        if kernel not in timings:
            raise ValueError(f"its kernel {kernel} has no timing")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if timed:
            log.warning("ignoring the kernel cache file %s: %s", path, e)
        return None, {}
    return kernel, timings


def store_choice(path: Path, kernel: str, timings: dict[str, float]) -> None:
    """Keep the kernels' timed choice beside the probe result."""
    _update(path, choice={"kernel": kernel, "timings": timings})


# ---------------------------------------------------------------- a probe still timing kernels


def pending_path(path: Path) -> Path:
    """The marker of a probe that will write ``path`` once its kernel timing ends."""
    return path.with_name(path.name + ".pending")


def mark_pending(path: Path, until: float) -> None:
    """Say that this process will write ``path`` by ``until`` (epoch seconds): a worker of this
    node waits for it (``wait_for``) rather than timing the same kernels again beside it."""
    try:
        _write(pending_path(path), {"pid": os.getpid(), "until": until})
    except OSError as e:
        log.warning("could not write %s (%s); workers will not wait for this probe", pending_path(path), e)


def clear_pending(path: Path) -> None:
    try:
        pending_path(path).unlink(missing_ok=True)
    except OSError:
        pass


def _pending(path: Path) -> bool:
    """Whether a live process on this node still promises to write ``path``."""
    try:
        marker = json.loads(pending_path(path).read_text())
        pid, until = int(marker["pid"]), float(marker["until"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if time.time() >= until:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def wait_for(path: Path, poll_s: float = 0.2) -> tuple[Lookup, float]:
    """(``load(path)``, seconds waited): while this node's probe is still timing kernels for the
    entry (``mark_pending``), wait for it, up to the probe's own deadline. Also where an older
    entry is there: under ``--fresh-preflight`` the probe under way is the one asked for."""
    started = time.monotonic()
    while _pending(path):
        time.sleep(poll_s)
    return load(path), time.monotonic() - started


def mark_stale(path: Path, reason: str) -> bool:
    """Make the next lookup of this entry a miss; True if there was an entry to mark."""
    found = load(path)
    if probe_result(found) is None:
        return False
    try:
        _write(path, dict(found.entry, stale=reason))
    except OSError as e:
        log.warning("could not mark the preflight cache %s stale (%s); removing it", path, e)
        path.unlink(missing_ok=True)
    return True
