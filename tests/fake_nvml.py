"""A canned NVML for the health checks (orchestrator/preflight/health.py's seam): the readings come
from FAKE_NVML_READINGS (JSON) in the environment, so each node of a simulated cluster reports the
GPUs its test gives it, through the real probe."""

from __future__ import annotations

import json
import os

from orchestrator.preflight.health import NVML_ENV

READINGS_ENV = "FAKE_NVML_READINGS"


def gpu(index: int = 0, **overrides) -> dict:
    """A healthy H100's readings, changed by ``overrides``."""
    return {"index": index, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-fake-{index}", "ecc_volatile": 0,
            "ecc_aggregate": 0, "retired_pending": False, "remapped_pending": False, "remapped_failed": False,
            "throttle": [], "persistence": True, "pcie_gen": 5, "pcie_gen_max": 5, "pcie_width": 16,
            "pcie_width_max": 16, "mig": False, "nvlinks": 18, **overrides}


class CannedNVML:
    def __init__(self, readings: list[dict]):
        self._readings = readings

    def readings(self) -> list[dict]:
        return [dict(r) for r in self._readings]


def from_env() -> CannedNVML:
    return CannedNVML(json.loads(os.environ[READINGS_ENV]))


def node_env(readings: list[dict]) -> dict[str, str]:
    """The environment that makes a node's probe read ``readings``."""
    return {NVML_ENV: f"{__name__}:from_env", READINGS_ENV: json.dumps(readings)}
