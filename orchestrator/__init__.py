"""The Ray driver: config, preflight, plan, launch, results. ``python -m orchestrator --help``."""

__version__ = "0.1.0"
