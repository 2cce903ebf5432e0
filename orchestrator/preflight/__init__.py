"""Preflight: what each node can run, before anything trains.

probe (facts, in a child process on each node, or reused from the node's cache) -> rules
(causes and verdicts, pure) -> report (table, preflight.json, flash_attention_log.txt,
NodeCapacity for the planner).

The names below load on first use: a probe task on a node imports this package, and must not
pay for torch (which the report's planner types pull in) before it has even looked at its cache.
"""

import importlib

_EXPORTS = {"ProbeSettings": "settings", "settings_for": "settings", "run_preflight": "fanout", "LocalProbe": "fanout",
            "PreflightReport": "findings", "NodeReport": "findings", "PREFLIGHT_FILE": "findings",
            "LOG_FILE": "findings", "parse_probe": "child", "verdict": "rules"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
