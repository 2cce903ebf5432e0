"""Stragglers in a two-worker Ray run on CPU: a rank slowed by train.fault (kind slow) is named in
the progress lines, metrics.jsonl and summary.json; a run of even ranks names none."""

import json
import platform

import pytest

from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from trainer.metrics import read_metrics

pytestmark = pytest.mark.ray

QUICK = {"max_steps": 8, "checkpoint_every": 100, "checkpoint_at_end": False}


def _train(tmp_path, name, train_overrides, caplog):
    cfg = write_config(tmp_path / f"{name}.yaml", {"train": {**QUICK, **train_overrides}})
    with caplog.at_level("INFO", logger="orchestrator.progress"):
        summary = train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name))
    steps = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    return summary.variants["flash"], tmp_path / "runs" / name, steps


def test_a_slow_rank_is_named_a_straggler_in_progress_and_summary(ray_session, tmp_path, caplog):
    rec, run_dir, progress = _train(tmp_path, "slow", {"fault": {"kind": "slow", "rank": 1, "step": 1,
                                                                 "slow_s": 0.1}}, caplog)
    assert rec.status == "succeeded"
    [named] = rec.stragglers
    assert (named["rank"], named["hostname"]) == (1, platform.node()) and named["ratio"] > 1.5  # of two ranks, the median is their mean
    assert named == json.loads((run_dir / "summary.json").read_text())["variants"]["flash"]["stragglers"][0]
    last = read_metrics(run_dir / "flash" / "metrics.jsonl")[-1]
    assert last["rank_compute_s"][1] >= 0.1 > last["rank_compute_s"][0]
    assert progress[-1].startswith("[flash] step 8/8") and " straggler rank 1 on " in progress[-1]


def test_even_ranks_name_no_straggler(ray_session, tmp_path, caplog):
    # Every rank slowed alike: a tiny step is a few milliseconds on a shared CPU, where noise and
    # rank 0's logging alone move one rank past 1.1x of the other.
    rec, run_dir, progress = _train(tmp_path, "even", {"fault": {"kind": "slow", "rank": None, "step": 1,
                                                                 "slow_s": 0.05}}, caplog)
    assert rec.status == "succeeded" and rec.stragglers == []
    assert len(read_metrics(run_dir / "flash" / "metrics.jsonl")[-1]["rank_compute_s"]) == 2
    assert progress and not any("straggler" in line for line in progress)
