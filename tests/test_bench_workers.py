"""`bench --workers`: the training benchmark at several worker counts through the real train path."""

import json

import pytest

from orchestrator.bench import workers
from tests.conftest import run_cli


def _summary(tokens_per_s, n, device="NVIDIA H100 80GB HBM3", use_gpu=True):
    rec = {"status": "succeeded", "strategy": "ddp", "backend": "sdpa_cudnn", "tokens_per_s": tokens_per_s,
           "step_time_s": 0.2, "flops_per_token": 6e9, "use_gpu": use_gpu, "peak_mem_bytes": 30 * 2**30,
           "peak_mem_kind": "cuda_max_allocated", "workers": [{"device": device}] * n}
    return {"run": {"dir": f"/runs/w{n}"}, "variants": {"flash": rec}}


def test_rows_give_mfu_over_all_gpus_and_scaling_against_the_smallest_count():
    rows = workers.add_scaling([workers.row(1, _summary(80000, 1)), workers.row(2, _summary(152000, 2))])
    one, two = rows
    assert one["mfu"] == pytest.approx(6e9 * 80000 / 989e12)
    assert two["mfu"] == pytest.approx(6e9 * 152000 / (2 * 989e12))
    assert (one["scaling"], two["scaling"]) == (1.0, pytest.approx(1.9))
    assert two["efficiency"] == pytest.approx(0.95) and two["peak_mem_bytes_per_gpu"] == 30 * 2**30
    table = "\n".join(workers.markdown(rows))
    assert "| 2 | ddp | 152,000 | 76,000 |" in table and "1.90x | 95.0% |" in table


def test_a_failed_count_is_reported_and_left_out_of_the_scaling():
    failed = {"run": {"dir": "/runs/x"}, "variants": {"flash": {"status": "failed", "error": "boom"}}}
    rows = workers.add_scaling([workers.row(1, _summary(100.0, 1, "cpu", False)), workers.row(2, failed)])
    assert rows[1]["status"] == "failed" and "scaling" not in rows[1] and rows[0]["mfu"] is None


@pytest.mark.ray
def test_bench_workers_trains_under_torchtrainer_at_each_count(tmp_path, cli_env):
    out = run_cli(["bench", "--quick", "--skip-kernels", "--skip-training", "--variants", "flash",
                   "--workers", "1,2", "--output-dir", str(tmp_path)], cli_env, tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (bench_json,) = tmp_path.glob("bench-*/bench.json")
    rows = json.loads(bench_json.read_text())["workers"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert all(r["status"] == "succeeded" and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["scaling"] == 1.0 and rows[1]["scaling"] > 0
    assert "## Worker counts, under Ray Train" in next(tmp_path.glob("bench-*/bench.md")).read_text()
