"""Preflight: what each node can run, before anything trains.

probe (facts, in a child process on each node) -> rules (causes and verdicts, pure) ->
report (table, preflight.json, flash_attention_log.txt, NodeCapacity for the planner).
"""

from orchestrator.preflight.settings import ProbeSettings, settings_for
from orchestrator.preflight.fanout import run_preflight
from orchestrator.preflight.findings import LOG_FILE, PREFLIGHT_FILE, NodeReport, PreflightReport

__all__ = ["ProbeSettings", "settings_for", "run_preflight", "PreflightReport", "NodeReport", "PREFLIGHT_FILE", "LOG_FILE"]
