"""Stragglers while training: which ranks the window names (trainer/straggler.py), what each
rank's timer measures, and how the driver shows them (progress line, summary.json)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from orchestrator import results
from orchestrator.progress import ProgressFollower
from trainer import straggler
from trainer.config import TrainConfig


def test_a_rank_above_1_1x_the_median_rank_is_named_with_its_ratio():
    windows = [[0.10] * 20, [0.10] * 20, [0.10] * 19 + [0.50], [0.12] * 20]
    assert straggler.stragglers(windows) == {3: pytest.approx(1.2)}


def test_ranks_within_1_1x_of_the_median_are_not_stragglers():
    assert straggler.stragglers([[0.10, 0.11, 0.10], [0.105, 0.109, 0.104], [0.109] * 3]) == {}
    assert straggler.stragglers([[0.2] * 5]) == {}  # a single rank is its own median


def test_a_few_slow_steps_do_not_make_a_straggler_but_a_slow_median_does():
    blips = [0.1] * 17 + [1.0] * 3
    assert straggler.stragglers([[0.1] * 20, [0.1] * 20, blips]) == {}
    assert straggler.stragglers([[0.1] * 20, [0.1] * 20, [0.1] * 9 + [0.3] * 11]) == {2: pytest.approx(3.0)}


def test_the_timer_keeps_the_last_window_of_steps_and_leaves_out_the_first_two():
    timer = straggler.ComputeTimer(torch.device("cpu"), window=3)
    for pause in (0.05, 0.05, 0.0, 0.0, 0.0, 0.02):
        timer.start()
        time.sleep(pause)
        timer.stop()
    window = timer.window_s()
    assert len(window) == 3 and window[-1] >= 0.02 and max(window[:2]) < 0.02


def test_a_metrics_record_names_the_straggler_with_its_host():
    rec = straggler.record([[0.1] * 4, [0.25] * 4], ["node-a", "node-b"])
    assert rec["rank_compute_s"] == [0.1, 0.25]
    assert rec["stragglers"] == [{"rank": 1, "hostname": "node-b", "ratio": pytest.approx(1.429, abs=1e-3)}]


def _rec(step: int, stragglers: list[dict]) -> dict:
    return {"step": step, "loss": 5.0, "tokens_per_s": 100.0, "step_time_s": 0.1, "stragglers": stragglers}


def test_the_summary_names_each_straggler_once_with_its_highest_ratio():
    b = {"rank": 1, "hostname": "node-b"}
    logged = [_rec(2, []), _rec(4, [{**b, "ratio": 1.5}]), _rec(6, [{**b, "ratio": 2.5}]), _rec(8, [{**b, "ratio": 1.2}])]
    assert results.straggler_fields(logged) == {"stragglers": [{**b, "ratio": 2.5, "steps": 3}]}
    assert results.straggler_fields([_rec(2, [])]) == {}
    rec = results.VariantResult(status="succeeded", attention="flash", steps=8, restarts=0,
                                **results.straggler_fields(logged))
    summary = results.RunSummary(run=results.RunInfo(name="r", dir="/r", status="succeeded"), variants={"flash": rec})
    assert summary.describe()[0].endswith(", restarts 0, straggler rank 1 on node-b (2.50x the median rank)")


def test_the_progress_line_names_a_straggler_and_none_where_there_is_none(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    with caplog.at_level("INFO", logger="orchestrator.progress"):
        with ProgressFollower(metrics, "flash", 4, interval_s=0.05):
            metrics.write_text("".join(json.dumps(r) + "\n" for r in (
                _rec(2, []), _rec(4, [{"rank": 1, "hostname": "node-b", "ratio": 1.83}]))))
    first, second = [r.getMessage() for r in caplog.records]
    assert "straggler" not in first
    assert second.endswith("0.100 s/step  straggler rank 1 on node-b (1.83x the median rank)")


def test_every_rank_slowed_is_a_slow_fault_only():
    assert TrainConfig(fault={"kind": "slow", "rank": None, "step": 1}).fault.rank is None
    with pytest.raises(ValueError, match="fault.rank null .* only for kind slow, not kill"):
        TrainConfig(fault={"kind": "kill", "rank": None, "step": 1})
