"""What ``train --resume`` notices has changed since the run started (issue 32): other data, or a
config.yaml edited to another model shape or sequence length, is refused before Ray starts in one
line naming both; a checkpoint that does not fit the model, found in a worker, is not retried."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator import preprocess
from orchestrator.errors import UsageError
from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from trainer import dataset

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


def _edit_config(run_dir: Path, section: str, **values) -> None:
    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("section,key,value,was", [("model", "dim", 128, 64), ("train", "seq_len", 16, 32)])
def test_resume_refuses_an_edited_shape_or_seq_len_naming_the_key_and_both_values(run_copy, section, key, value,
                                                                                   was):
    """dim: the checkpoint would not load (and was retried); seq_len: the saved data position would
    silently mean other windows. Both refused before Ray starts."""
    _edit_config(run_copy, section, **{key: value})
    with pytest.raises(UsageError) as e:
        train(TrainOptions(resume=str(run_copy)))
    assert str(e.value) == (f"--resume {run_copy}: variant flash: {section}.{key} is {value} in "
                            f"{run_copy}/config.yaml, but its checkpoints were trained with {was}; "
                            "set it back or start a new run")


def test_a_checkpoint_that_does_not_fit_the_model_fails_the_variant_without_retries(run_copy):
    """A run without the record (made before it existed): the worker finds the mismatch on load,
    a config error that no restart fixes, so max_failures 2 are not spent on it."""
    (run_copy / "started_with.json").unlink()
    _edit_config(run_copy, "model", dim=128)
    _edit_config(run_copy, "scaling", max_failures=2)
    rec = train(TrainOptions(resume=str(run_copy))).variants["flash"]
    assert (rec.status, rec.failure_kind, rec.restarts) == ("failed", "config", 0), rec
    assert "does not fit the model of this config" in rec.error and "size mismatch" in rec.error
    assert "not retried: a restart would fail the same way" in rec.error
