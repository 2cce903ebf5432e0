"""`bench --workers`: the training benchmark at several worker counts through the real train path."""

import json

import pytest

from bench import command, workers
from orchestrator.errors import UsageError
from tests.conftest import run_cli


def _summary(tokens_per_s, n, device="NVIDIA H100 80GB HBM3", use_gpu=True, strategy="ddp"):
    rec = {"status": "succeeded", "strategy": strategy, "backend": "sdpa_cudnn", "tokens_per_s": tokens_per_s,
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


def test_each_strategy_scales_against_its_own_smallest_count_and_fsdp_is_compared_with_the_best_ddp():
    rows = workers.add_scaling([workers.row(1, _summary(80000, 1)), workers.row(2, _summary(152000, 2)),
                                workers.row(1, _summary(70000, 1, strategy="fsdp")),
                                workers.row(2, _summary(147000, 2, strategy="fsdp"))])
    assert [(r["strategy"], r["workers"], r["scaling"]) for r in rows] == [
        ("ddp", 1, 1.0), ("ddp", 2, pytest.approx(1.9)), ("fsdp", 1, 1.0), ("fsdp", 2, pytest.approx(2.1))]
    (cmp,) = workers.fsdp_vs_ddp(rows)
    assert cmp["workers"] == 2 and cmp["ratio"] == pytest.approx(147000 / 152000) and cmp["met"]
    table = "\n".join(workers.markdown(rows))
    assert "fsdp / best ddp tokens/s at 2 workers: 147,000 / 152,000 = 0.967 (goal >= 0.95: met)" in table
    slow = [workers.row(2, _summary(152000, 2)), workers.row(2, _summary(140000, 2, strategy="fsdp"))]
    assert "= 0.921 (goal >= 0.95: not met)" in "\n".join(workers.markdown(workers.add_scaling(slow)))


def test_no_comparison_without_both_strategies_at_a_count_of_several_workers():
    rows = [workers.row(1, _summary(80000, 1)), workers.row(1, _summary(70000, 1, strategy="fsdp")),
            workers.row(2, _summary(152000, 2))]
    assert workers.fsdp_vs_ddp(rows) == [] and "fsdp / best ddp" not in "\n".join(workers.markdown(rows))


def test_strategies_flag_takes_ddp_and_fsdp_only():
    assert command._strategies("fsdp, ddp,fsdp") == ["fsdp", "ddp"]
    with pytest.raises(UsageError, match=r"--strategies: unknown tp; expected some of ddp, fsdp"):
        command._strategies("ddp,tp")


@pytest.mark.ray
def test_bench_workers_trains_under_torchtrainer_at_each_count_and_strategy(tmp_path, cli_env):
    # Two workers under each strategy through the real TorchTrainer path; the scaling over
    # several counts is the pure functions' (tests above), so one count keeps CI short.
    out = run_cli(["bench", "--quick", "--skip-kernels", "--skip-training", "--variants", "flash",
                   "--workers", "2", "--strategies", "ddp,fsdp", "--output-dir", str(tmp_path)],
                  cli_env, tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (bench_json,) = tmp_path.glob("bench-*/bench.json")
    report = json.loads(bench_json.read_text())
    rows = report["workers"]
    assert [(r["strategy"], r["workers"]) for r in rows] == [("ddp", 2), ("fsdp", 2)]
    assert all(r["status"] == "succeeded" and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[0]["scaling"] == rows[1]["scaling"] == 1.0  # each against its own smallest count
    assert [c["workers"] for c in report["fsdp_vs_ddp"]] == [2]
    md = next(tmp_path.glob("bench-*/bench.md")).read_text()
    assert "## Worker counts, under Ray Train" in md and "fsdp / best ddp tokens/s at 2 workers:" in md
