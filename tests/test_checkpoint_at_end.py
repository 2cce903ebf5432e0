"""``train.checkpoint_at_end``: the last step is saved by default, and not when switched off
(a benchmark of a large model need not write ~16 bytes per parameter at its end)."""

from __future__ import annotations

import json

import pytest

from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from trainer import checkpoint

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("at_end, expected", [(True, [3, 5]), (False, [3])])
def test_last_step_is_saved_unless_switched_off(tmp_path, at_end, expected):
    cfg = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 5, "checkpoint_every": 3,
                                                       "checkpoint_at_end": at_end},
                                             "scaling": {"num_workers": 1}})
    summary = train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name="r"))
    assert summary.run.status == "succeeded"
    run = tmp_path / "runs" / "r"
    variant = json.loads((run / "summary.json").read_text())["variants"]["flash"]
    assert variant["status"] == "succeeded" and variant["steps"] == 5  # the run itself is whole either way
    assert variant["workers"][0]["gpu_ids"] == []  # a CPU worker holds no GPU (a GPU one names its index)
    saved = [int(d.name.rsplit("_", 1)[1]) for d in checkpoint.checkpoint_dirs(run / "flash" / checkpoint.STORAGE_NAME)]
    assert sorted(saved) == expected
