"""What ``train --resume`` notices has changed since the run started (issue 32): other data is
refused before Ray starts, in one line naming both datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import UsageError
from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from trainer import dataset, preprocess

pytestmark = pytest.mark.ray

EVERY = 2


@pytest.fixture(scope="module")
def stopped_run(ray_session, tmp_path_factory) -> Path:
    """A run on a dataset of its own that failed after its first checkpoint (a worker killed, no
    restarts allowed): what --resume continues."""
    tmp = tmp_path_factory.mktemp("stopped")
    shutil.copytree(preprocess.embedded_dataset(), tmp / "data")
    cfg = write_config(tmp / "run.yaml", {
        "data": {"path": str(tmp / "data")},
        "train": {"max_steps": 4, "checkpoint_every": EVERY, "fault": {"rank": 0, "step": EVERY + 1}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0}})
    rec = train(TrainOptions(config_file=str(cfg), output_dir=str(tmp / "runs"), name="r")).variants["flash"]
    assert rec.status == "failed", rec
    return tmp / "runs" / "r"


@pytest.fixture
def run_copy(stopped_run, tmp_path) -> Path:
    """A copy of the stopped run (and its data), for a test to change."""
    shutil.copytree(stopped_run.parent.parent / "data", tmp_path / "data")
    shutil.copytree(stopped_run, tmp_path / "runs" / "r")
    config = tmp_path / "runs" / "r" / "config.yaml"
    config.write_text(config.read_text().replace(str(stopped_run.parent.parent / "data"), str(tmp_path / "data")))
    return tmp_path / "runs" / "r"


def test_resume_refuses_data_rewritten_in_place_naming_both(stopped_run, run_copy, tmp_path):
    """Another corpus of the same size and vocab where the run's data was: a resume would train
    on it silently (the loss jumps); it is refused, before Ray starts, naming both."""
    tokens = tmp_path / "data" / dataset.TOKENS_FILE
    before = dataset.describe_fingerprint(dataset.fingerprint(dataset.load_dataset(stopped_run.parent.parent / "data")))
    tokens.write_bytes(np.roll(np.fromfile(tokens, dtype=np.uint8), 2).tobytes())
    after = dataset.describe_fingerprint(dataset.fingerprint(dataset.load_dataset(tmp_path / "data")))
    with pytest.raises(UsageError) as e:
        train(TrainOptions(resume=str(run_copy)))
    assert str(e.value) == (f"--resume {run_copy}: the data changed since the run started: it trained on {before}, "
                            f"and now finds {after}; restore that data or start a new run")
