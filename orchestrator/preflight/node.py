"""What runs on each node during preflight: the node's cached result while its key holds,
else the probe child (whose good result is then cached). Imports neither torch nor flash-attn:
a reused result costs the task only a fresh health check (NVML; on GPU nodes also the GEMM
canary, which imports torch), not the probe's imports and kernel checks.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

from orchestrator.preflight.child import PYTHON, parse_probe, probe_env, run_probe
from orchestrator.preflight.probe import MARKER, tail
from orchestrator.preflight.settings import ProbeSettings
from orchestrator.preflight.rules import verdict
from trainer import strict_json
from trainer.attention import cache


def probe_or_reuse(argv: list[str], settings: ProbeSettings, fresh: bool, environ: Optional[dict] = None,
                   early: Optional[Callable[[dict], None]] = None) -> dict:
    """run_probe's output (reused or new) plus ``cache``: reused or not, the entry, and why not.

    ``early(raw)``, where given, gets the probe's facts before its kernels are timed, as a raw
    output of their own (``partial``: true): the plan needs only the verdict. This node's workers
    then wait for the timed choice (``cache.wait_for``) instead of timing again."""
    env = probe_env(settings.disable_flash_attn, environ)
    key = cache.node_key(settings.shape, settings.disable_flash_attn, env)
    path = cache.entry_path(key, env)
    found = cache.Lookup(path, None, "--fresh-preflight") if fresh else cache.load(path)
    if cache.probe_result(found) is not None:
        raw = dict(found.entry["raw"], cache={"reused": True, "path": str(path), "created": found.entry["created"]})
        return with_fresh_health(raw, env, settings.timeout_s)
    if found.entry is not None:  # a worker's kernel timing only
        found.why_not = "no cached result for this node's current state"
    info = {"reused": False, "path": str(path), "why_not": found.why_not}
    started = time.monotonic()
    on_facts = None
    if early is not None:
        def on_facts(line: str) -> None:
            facts = json.loads(line[len(MARKER):])
            if (facts.get("kernel_selection") or {}).get("deferred"):
                cache.mark_pending(path, time.time() + settings.timeout_s)
                early({"returncode": 0, "stdout": line, "stderr": "", "timed_out": False, "partial": True,
                       "seconds": round(time.monotonic() - started, 3), "cache": dict(info, timing="under way")})
    try:
        raw = run_probe(argv, settings.timeout_s, env, on_facts=on_facts)
        facts, _ = parse_probe(raw, settings.timeout_s)
        if facts is not None:  # a crash or a hang may be transient: only a complete result is kept
            v = verdict(facts)
            cache.store(path, key, raw, {"flash_ok": v.flash_ok, "flash_kernel": v.flash_kernel,
                                         "kernel_timings": v.kernel_timings})
    finally:
        if early is not None:
            cache.clear_pending(path)
    return dict(raw, cache=info)


def with_fresh_health(raw: dict, env: dict, timeout_s: float) -> dict:
    """A reused result with the node's health read now (``python -m orchestrator.preflight.health``):
    a GPU falls sick without anything in the cache's key changing."""
    lines = raw["stdout"].splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith(MARKER))
    facts = json.loads(lines[last][len(MARKER):])
    out = run_probe([PYTHON, "-m", "orchestrator.preflight.health"], timeout_s, env)
    found = [line for line in (out["stdout"] or "").splitlines() if line.startswith(MARKER)]
    facts["health"] = json.loads(found[-1][len(MARKER):]) if out["returncode"] == 0 and found else {
        "nvml_error": "the health check did not finish: " + (tail(out["stderr"] or "", 3) or "no output")}
    lines[last] = MARKER + strict_json.dumps(facts, default=str)
    return dict(raw, stdout="\n".join(lines) + "\n")
