"""What runs on each node during preflight: the node's cached result while its key holds,
else the probe child (whose good result is then cached). Imports neither torch nor flash-attn,
so a reused result costs the task milliseconds, not the seconds of a torch import.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

from orchestrator.preflight.child import parse_probe, probe_env, run_probe
from orchestrator.preflight.probe import MARKER
from orchestrator.preflight.settings import ProbeSettings
from orchestrator.preflight.rules import verdict
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
        return dict(found.entry["raw"], cache={"reused": True, "path": str(path), "created": found.entry["created"]})
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
