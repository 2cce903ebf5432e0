"""Held-out evaluation through the real Ray Train path on CPU workers (issue 33): one worker and
two give the same held-out losses; the summary and the report carry them, and the report's
verdict names the better of two models and finds no difference between one model trained twice."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from trainer.metrics import read_metrics

pytestmark = pytest.mark.ray


def _train(tmp_path: Path, name: str, overrides: dict) -> dict:
    cfg = write_config(tmp_path / f"{name}.yaml", overrides)
    return train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name)).model_dump()


def _evaluations(vdir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(vdir / "metrics.jsonl") if "val_loss" in r}


def test_one_worker_and_two_evaluate_the_same_batches_to_the_same_held_out_loss(ray_session, tmp_path):
    """One worker accumulating two micro-batches trains on the windows two workers train on (the
    same weights, to fp32 rounding); the held-out batches never depend on the worker count."""
    train_cfg = {"max_steps": 4, "eval_every": 2, "checkpoint_every": 4}
    one = _train(tmp_path, "one", {"train": {**train_cfg, "grad_accum_steps": 2},
                                   "scaling": {"num_workers": 1, "cpus_per_worker": 1}})["variants"]["flash"]
    two = _train(tmp_path, "two", {"train": train_cfg})["variants"]["flash"]
    assert (one["num_workers"], two["num_workers"]) == (1, 2)
    a, b = _evaluations(tmp_path / "runs" / "one" / "flash"), _evaluations(tmp_path / "runs" / "two" / "flash")
    assert list(a) == list(b) == [2, 4]
    for step in a:
        assert a[step]["val_tokens"] == b[step]["val_tokens"] == 8 * 4 * 32  # 8 batches of 4 windows of 32 tokens
        assert a[step]["val_loss"] == pytest.approx(b[step]["val_loss"], abs=1e-5)
        assert a[step]["val_batch_losses"] == pytest.approx(b[step]["val_batch_losses"], abs=1e-5)
    assert two["final_val_loss"] == b[4]["val_loss"]
    assert two["best_val_loss"] == min(b[2]["val_loss"], b[4]["val_loss"]) and two["best_val_step"] in (2, 4)
    assert two["eval_s"] > 0


def test_the_report_names_the_better_model_and_finds_no_difference_in_one_model_trained_twice(ray_session, tmp_path):
    untrained = {"lr": 1e-7, "min_lr": 0.0}  # a model that barely moves from its initial weights
    cfg = {"train": {"max_steps": 20, "eval_every": 10, "checkpoint_every": 20},
           "scaling": {"num_workers": 1, "cpus_per_worker": 1},
           "variants": [{"name": "trained", "attention": "flash"},
                        {"name": "untrained", "attention": "flash", "train": untrained},
                        {"name": "again", "attention": "flash"}]}
    summary = _train(tmp_path, "three", cfg)
    assert {n: v["status"] for n, v in summary["variants"].items()} == dict.fromkeys(["trained", "untrained", "again"], "succeeded")
    report = (tmp_path / "runs" / "three" / "report.md").read_text()
    assert "trained is better than untrained by " in report
    assert "held-out loss at step 20 (" in report
    assert "no difference within noise between trained and again at step 20" in report
    assert "held-out parity OK" in report
    assert "![val_loss](val_loss.png)" in report and (tmp_path / "runs" / "three" / "val_loss.png").is_file()


def test_seeds_train_each_variant_k_times_and_the_report_compares_their_means(ray_session, tmp_path):
    """--run-both-models --seeds 2: four runs, each a variant of its own directory and record;
    summary.json groups them, and the verdict is on the means over the seeds."""
    cfg = write_config(tmp_path / "seeds.yaml", {
        "train": {"max_steps": 20, "eval_every": 10, "checkpoint_every": 20},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "variants": [{"name": "trained", "attention": "flash"},
                     {"name": "untrained", "attention": "flash", "train": {"lr": 1e-7, "min_lr": 0.0}}]})
    summary = train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name="seeds",
                                 run_both_models=True, seeds=2)).model_dump()
    run_dir = tmp_path / "runs" / "seeds"
    runs = ["trained-s1", "trained-s2", "untrained-s1", "untrained-s2"]
    assert {n: v["status"] for n, v in summary["variants"].items()} == dict.fromkeys(runs, "succeeded")
    assert all(_evaluations(run_dir / n) for n in runs)
    first = {n: read_metrics(run_dir / n / "metrics.jsonl")[0]["loss"] for n in runs}
    assert first["trained-s1"] != first["trained-s2"]  # another seed: other initial weights and batches
    groups = json.loads((run_dir / "summary.json").read_text())["seed_groups"]
    assert {g: (x["variants"], x["seeds"], x["succeeded"], x["step"]) for g, x in groups.items()} == {
        "trained": (["trained-s1", "trained-s2"], [1337, 1338], 2, 20),
        "untrained": (["untrained-s1", "untrained-s2"], [1337, 1338], 2, 20)}
    finals = [summary["variants"][n]["final_val_loss"] for n in runs[:2]]
    assert groups["trained"]["final_val_loss_mean"] == pytest.approx(statistics.fmean(finals))
    assert groups["trained"]["final_val_loss_std"] == pytest.approx(statistics.stdev(finals))
    report = (run_dir / "report.md").read_text()
    assert "- trained is better than untrained by " in report
    assert "(means over 2 seeds each, ± one standard error from the spread over seeds and 8 paired batches)" in report
    assert "| trained | 2 of 2 succeeded | 1337, 1338 | " in report
