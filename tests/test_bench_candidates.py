"""bench --sweep (candidates against a baseline in one run) and bench --float8-check (float8
against bf16 after N steps): the parsing, the comparison logic, and both on CPU."""

import pytest
import torch

from bench import command, float8_check, sweep
from orchestrator import config as config_mod, preprocess
from orchestrator.errors import UsageError
from trainer import dataset as dataset_mod


def test_a_sweep_is_sections_keys_and_yaml_values():
    assert sweep.parse("train.micro_batch_size=8, train.loss_impl=chunked,model.tie_embeddings=false") == {
        "train": {"micro_batch_size": 8, "loss_impl": "chunked"}, "model": {"tie_embeddings": False}}


@pytest.mark.parametrize("text,message", [
    ("micro_batch_size=8", "expected comma-separated SECTION.KEY=VALUE"),
    ("scaling.num_workers=2", "expected comma-separated SECTION.KEY=VALUE"),
    ("train.loss_impl", "expected comma-separated SECTION.KEY=VALUE"),
    ("train.seed=1,train.seed=2", "train.seed given twice"),
])
def test_a_malformed_sweep_is_a_usage_error_quoting_it(text, message):
    with pytest.raises(UsageError, match=message):
        sweep.parse(text)


def test_sweep_overrides_are_validated_against_the_config_naming_the_key():
    base = config_mod.validate(command.QUICK, "--quick")
    with pytest.raises(UsageError, match=r"--sweep 'train.loss_impl=fast': train\.loss_impl: .*'chunked'"):
        sweep.configs(base, ["train.micro_batch_size=4", "train.loss_impl=fast"])
    with pytest.raises(UsageError, match=r"unknown key 'train\.loss'; valid keys: .*loss_impl"):
        sweep.configs(base, ["train.loss=chunked"])
    labels = [(label, c.train.micro_batch_size, c.train.loss_impl)
              for label, c in sweep.configs(base, ["train.micro_batch_size=4,train.loss_impl=chunked"])]
    assert labels == [("baseline", 2, "standard"), ("train.micro_batch_size=4,train.loss_impl=chunked", 4, "chunked")]


def test_deltas_are_against_the_baseline_row_and_absent_where_a_row_did_not_run():
    rows = sweep.with_deltas([{"status": "ok", "tokens_per_s": 100.0}, {"status": "ok", "tokens_per_s": 112.5},
                              {"status": "oom"}])
    assert [r["delta_pct"] for r in rows] == [0.0, pytest.approx(12.5), None]
    assert [r["delta_pct"] for r in sweep.with_deltas([{"status": "error"}, {"status": "ok", "tokens_per_s": 1.0}])] \
        == [None, None]


def _cpu_data():
    return dataset_mod.load_dataset(preprocess.embedded_dataset())


def test_a_cpu_sweep_trains_the_baseline_then_each_candidate_on_the_same_batches():
    base = config_mod.validate(command.QUICK, "--quick")
    data = _cpu_data()
    rows = sweep.run(base, ["train.loss_impl=chunked", "train.loss_impl=liger"], variant="flash", tokens=data.tokens,
                     vocab_size=data.vocab_size, device=torch.device("cpu"), warmup=1, iters=2)
    assert [(r["candidate"], r["loss_impl"], r["status"]) for r in rows] == [
        ("baseline", "standard", "ok"), ("train.loss_impl=chunked", "chunked", "ok"),
        ("train.loss_impl=liger", "liger", "error")]
    # Same weights, same first batch: the chunked loss is the standard loss.
    assert rows[1]["first_loss"] == pytest.approx(rows[0]["first_loss"], rel=1e-5)
    assert rows[0]["delta_pct"] == 0.0 and rows[1]["delta_pct"] is not None and rows[2]["delta_pct"] is None
    assert "train.loss_impl: liger needs a CUDA GPU" in rows[2]["error"]
    md = command.markdown({"started": "now", "command": "bench --sweep", "environment": {"device": "cpu", "torch": "x"},
                           "sweep": rows})
    assert "## Candidates against the baseline" in md and "| `train.loss_impl=chunked` | sdpa_flash_cpu | chunked |" in md


def _row(losses, tps, status="ok"):
    return {"status": status, "losses": losses, "tokens_per_s": tps}


def test_float8_passes_within_the_tolerance_of_the_mean_of_the_last_steps():
    bf16 = _row([9.0] * 5 + [4.0] * 10, 100.0)
    fp8 = _row([9.5] * 5 + [4.06] * 10, 116.0)  # +1.5% loss, 1.16x
    out = float8_check.compare(bf16, fp8, tolerance=0.02, spread=_row([4.1] * 15, 99.0))
    assert out["verdict"] == "pass" and out["loss_ok"] and out["speedup_ok"]
    assert out["bf16_loss"] == pytest.approx(4.0) and out["loss_rel_diff"] == pytest.approx(0.015)
    assert out["speedup"] == pytest.approx(1.16) and out["seed_spread"] == pytest.approx(0.025)


def test_float8_fails_beyond_the_tolerance_and_a_slow_float8_misses_the_speed_goal():
    out = float8_check.compare(_row([4.0] * 10, 100.0), _row([4.1] * 10, 110.0), tolerance=0.02)
    assert out["verdict"] == "fail" and out["loss_ok"] is False and out["speedup_ok"] is False
    assert out["seed_spread"] is None
    line = float8_check.verdict_line({**out, "steps": 10})
    assert "+2.50%" in line and "tolerance ±2.0%" in line and "FAIL" in line and "1.100x" in line and "not met" in line


def test_a_float8_run_that_did_not_finish_is_not_measured_and_a_nan_loss_fails():
    out = float8_check.compare(_row([4.0] * 10, 100.0), {"status": "error", "error": "ValueError: no GPU"})
    assert out["verdict"] == "not measured" and "float8: error ValueError: no GPU" in out["reason"]
    nan = float8_check.compare(_row([4.0] * 10, 100.0), _row([4.0] * 9 + [float("nan")], 120.0))
    assert nan["verdict"] == "fail" and nan["reason"] == "a loss was not finite"


def test_the_float8_check_on_cpu_trains_bf16_and_reports_float8s_refusal():
    cfg = config_mod.validate(command.QUICK, "--quick")
    data = _cpu_data()
    report = float8_check.run(cfg, variant="flash", tokens=data.tokens, vocab_size=data.vocab_size,
                              device=torch.device("cpu"), steps=4, warmup=1)
    runs = report["runs"]
    assert runs["bf16"]["status"] == "ok" and len(runs["bf16"]["losses"]) == 4
    assert runs["bf16_seed_plus_1"]["status"] == "ok"
    assert runs["bf16_seed_plus_1"]["first_loss"] != runs["bf16"]["first_loss"]  # another seed really ran
    assert runs["float8"]["status"] == "error" and runs["float8"]["float8_recipe"] == "tensorwise"
    assert "train.float8: true needs NVIDIA GPUs" in runs["float8"]["error"]
    assert report["verdict"] == "not measured" and report["seed_spread"] is not None
    md = "\n".join(float8_check.markdown(report))
    assert "float8 check after 4 steps: not measured (float8: error ValueError: train.float8: true" in md


@pytest.mark.ray  # a CLI subprocess
def test_bench_quick_with_a_sweep_and_the_float8_check_writes_both_sections(tmp_path, cli_env):
    import json

    from tests.conftest import run_cli

    out = run_cli(["bench", "--quick", "--skip-kernels", "--variants", "flash", "--sweep", "train.loss_impl=chunked",
                   "--float8-check", "--steps", "3", "--output-dir", str(tmp_path)], cli_env, tmp_path)
    assert out.returncode == 0, out.stderr
    [bench_dir] = tmp_path.glob("bench-*")
    report = json.loads((bench_dir / "bench.json").read_text())
    assert [(r["candidate"], r["status"]) for r in report["sweep"]] == [("baseline", "ok"),
                                                                        ("train.loss_impl=chunked", "ok")]
    assert "training" not in report and "partial" not in report
    check = report["float8_check"]
    assert check["verdict"] == "not measured" and len(check["runs"]["bf16"]["losses"]) == 3
    md = (bench_dir / "bench.md").read_text()
    assert "## Candidates against the baseline" in md and "## float8 against bf16" in md
    assert "float8 check after 3 steps: not measured" in md


def test_float8_on_data_read_more_than_once_is_inconclusive_and_says_what_corpus_it_needs():
    assert float8_check.data_passes(64_000, 200, 16_384) == pytest.approx(51.2)
    out = float8_check.compare(_row([4.0] * 10, 100.0), _row([5.0] * 10, 116.0), passes=51.2)
    assert out["verdict"] == "inconclusive" and out["loss_ok"] is False and out["data_passes"] == 51.2
    line = float8_check.verdict_line({**out, "steps": 200, "tokens_per_step": 16_384})
    assert "INCONCLUSIVE" in line and "read their data 51.2 times over" in line
    assert "a corpus of at least 3,276,800 tokens" in line
    # Read once at most: the tolerance decides.
    assert float8_check.compare(_row([4.0] * 10, 100.0), _row([5.0] * 10, 116.0), passes=0.5)["verdict"] == "fail"
