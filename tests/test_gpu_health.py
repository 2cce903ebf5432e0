"""On a CUDA GPU (skipped on CPU machines): the real NVML and the GEMM canary, through `preflight`.
The figures it prints are those docs/PREFLIGHT.md's "Node health" section quotes."""

import json

import pytest
import torch

from orchestrator.preflight import health
from tests.conftest import run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.ray,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_real_checks_put_each_gpus_results_and_their_time_in_preflight_json(tmp_path, cli_env):
    out = run_cli(["preflight", "--json", "--output-dir", "pf", "--fresh-preflight"], cli_env, tmp_path, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    [node] = json.loads((tmp_path / "pf" / "preflight.json").read_text())["nodes"]
    section = node["health"]
    print(json.dumps(section, indent=1))
    assert section["status"] in ("healthy", "degraded", "unhealthy") and 0 < section["seconds"] < 30
    gpus = torch.cuda.device_count()
    for check in ("ecc", "memory", "throttle", "persistence", "pcie", "mig", "gemm"):
        assert {c["gpu"] for c in section["checks"] if c["check"] == check} == set(range(gpus)), check
    canary = node["facts"]["health"]["canary"]["gpus"]
    assert all(r["tflops"] > 10 and len(r["sha256"]) == 64 for r in canary)


def test_the_canary_gives_the_same_bits_twice_on_one_gpu():
    first, second = (health.gemm_canary(torch, 0) for _ in range(2))
    assert first["sha256"] == second["sha256"]
