"""Shared fixtures. One Ray session serves every test that needs Ray (starting one costs ~10 s)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# A config small enough that a two-worker CPU run takes seconds.
TINY = {
    "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
    "train": {"seq_len": 32, "micro_batch_size": 4, "max_steps": 6, "checkpoint_every": 3,
              "warmup_steps": 2, "lr": 3e-3, "min_lr": 3e-4},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
}


# Ray Train's controller polls workers every 2 s, and a worker's second report waits for that
# poll (its result queue holds one): each checkpoint of a tiny run would cost ~2 s. The driver
# passes this to the controller it starts.
FAST_RAY_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3"}


def write_config(path: Path, overrides: dict | None = None) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session (4 logical CPUs so two 2-worker variants fit)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(FAST_RAY_TRAIN)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def cli_env():
    """Environment for running the CLI in a subprocess from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(FAST_RAY_TRAIN)
    return env


def run_cli(args: list[str], env: dict, cwd: Path, timeout: float = 300):
    import subprocess

    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
