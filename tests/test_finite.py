"""A NaN or infinite loss stops the variant (issue 32): the on-device watch of the training
loop (trainer/finite.py), and a Ray run with a learning rate that diverges."""

from __future__ import annotations

import math
import re

import pytest
import torch

from orchestrator.cli import main
from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from tests.test_strict_json import strict_loads
from trainer import checkpoint, finite
from trainer.config import TrainConfig
from trainer.failures import DeterministicFailure, classify
from trainer.metrics import read_metrics

CPU = torch.device("cpu")


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x)


def test_the_first_non_finite_step_since_the_last_check_is_named_and_not_retried():
    watch = finite.Watch(CPU)
    watch.stepped(1, _t(7.6), _t(0.9))
    watch.check(1, world=1)
    for step, (loss, norm) in enumerate([(4.5e5, 3e6), (math.nan, math.nan), (math.nan, math.inf)], start=2):
        watch.stepped(step, _t(loss), _t(norm))
    with pytest.raises(DeterministicFailure) as e:
        watch.check(4, world=1)
    assert e.value.kind == "non_finite_loss" and classify(e.value) is e.value
    assert str(e.value).startswith("the loss or gradient norm was not finite at step 3 (loss nan, grad norm nan); "
                                   "no checkpoint was written after it")


def test_an_infinite_gradient_norm_alone_stops_too():
    watch = finite.Watch(CPU)
    watch.stepped(5, _t(2.0), _t(math.inf))
    with pytest.raises(DeterministicFailure, match=r"at step 5 \(loss 2, grad norm inf\)"):
        watch.check(5, world=1)


def test_weights_are_checked_before_a_checkpoint():
    watch = finite.Watch(CPU)
    good, bad = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with torch.no_grad():
        bad.bias[1] = math.nan
    watch.stepped(6, _t(2.0), _t(1.0))
    watch.check(6, world=1, weights=good.parameters())
    with pytest.raises(DeterministicFailure, match="the weights were not finite after step 6"):
        watch.check(6, world=1, weights=bad.parameters())
    assert finite.non_finite(dict(good.named_parameters())) is None
    assert finite.non_finite(dict(bad.named_parameters())) == "NaN or infinite values in bias"


@pytest.mark.parametrize("key", ["lr", "weight_decay", "grad_clip"])
def test_infinite_or_nan_numbers_in_the_config_are_refused_naming_the_key(key):
    for value in (math.inf, math.nan):
        with pytest.raises(ValueError, match=f"{key}\n  Input should be a finite number"):
            TrainConfig(**{key: value})


@pytest.mark.ray
def test_a_diverging_run_stops_at_the_first_nan_without_retries_keeping_its_good_checkpoints(ray_session, tmp_path):
    """The reproduction of issue 32: lr 1000 takes a few steps to turn the loss or the gradient
    NaN. With a checkpoint every step, the variant fails at that step despite max_failures 2,
    writes no checkpoint from it, keeps the two before it (which export takes), and every JSON
    file of the run is strict JSON."""
    cfg = write_config(tmp_path / "nan.yaml", {"train": {"lr": 1.0e3, "warmup_steps": 0, "max_steps": 20,
                                                          "checkpoint_every": 1}})
    summary = train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name="nan"))
    assert summary.run.exit_code == 1
    rec = summary.variants["flash"]
    assert rec.status == "failed" and rec.restarts == 0 and rec.failure_kind == "non_finite_loss", rec
    found = re.fullmatch(r"the loss or gradient norm was not finite at step (\d+) \(loss \S+, grad norm \S+\); "
                         r"no checkpoint was written after it: .* \(not retried: a restart would fail the same way\)",
                         rec.error)
    assert found, rec.error
    bad = int(found[1])
    assert 1 < bad < 20

    run = tmp_path / "runs" / "nan"
    storage = run / "flash" / checkpoint.STORAGE_NAME
    assert sorted(p.name for p in storage.glob("checkpoint_*") if p.is_dir()) == [f"checkpoint_{s:08d}" for s in (bad - 2, bad - 1)
                                                                    if s > 0]
    assert read_metrics(run / "flash" / "metrics.jsonl")[-1]["step"] == bad - 1
    for path in [*run.rglob("*.json"), *run.rglob("*.jsonl")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            strict_loads(line)
    assert main(["export", str(run), "--output-dir", str(tmp_path / "hf")]) == 0  # its weights are finite
    assert (tmp_path / "hf" / "config.json").is_file()
