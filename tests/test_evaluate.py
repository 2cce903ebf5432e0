"""Held-out evaluation on CPU, without Ray: the split (trainer/dataset.py, trainer/evaluate.py),
the loss it measures, and the config checks before launch (issue 33)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.errors import UsageError
from orchestrator.run import TrainOptions, prepare
from tests.conftest import write_config
from trainer import evaluate
from trainer.attention import standard_attention
from trainer.config import ModelConfig
from trainer.dataset import BatchSampler, TokenDataset
from trainer.model import Transformer

SEQ, VOCAB = 16, 64


def _dataset(n_windows: int) -> TokenDataset:
    tokens = (np.arange(n_windows * SEQ + 1) * 7919 % VOCAB).astype(np.uint16)
    return TokenDataset(Path("."), {"vocab_size": VOCAB}, tokens)


def test_the_held_out_windows_are_never_sampled_for_training():
    trained, heldout = evaluate.split(_dataset(100), SEQ, val_fraction=0.1, val_path=None)
    assert trained == 90 and list(heldout.windows) == list(range(90, 100))
    sampler = BatchSampler(seed=3, n_windows=trained, micro_batch=4, grad_accum=2, world_size=2)
    sampled = {int(w) for step in range(60) for micro in range(2) for rank in range(2)  # five epochs
               for w in sampler.indices(step, micro, rank)}
    assert sampled == set(range(90))
    assert sampled.isdisjoint(int(w) for w in heldout.windows)


def test_the_held_out_windows_stay_out_of_training_across_elastic_resizes():
    """2 workers, then 1, then 3, each continuing from the last one's data position as the loop
    does (BatchSampler.continue_from), through several epochs: no held-out window is trained on."""
    trained, heldout = evaluate.split(_dataset(100), SEQ, val_fraction=0.1, val_path=None)
    sampled, consumed, step = set(), 0, 0
    for world, until in ((2, 20), (1, 50), (3, 80)):
        sampler = BatchSampler(seed=3, n_windows=trained, micro_batch=4, grad_accum=2, world_size=world)
        sampler.continue_from(step, consumed)
        sampled |= {int(w) for st in range(step, until) for micro in range(2) for rank in range(world)
                    for w in sampler.indices(st, micro, rank)}
        step, consumed = until, sampler.consumed(until)
    assert consumed > 5 * trained and sampled == set(range(90))
    assert sampled.isdisjoint(int(w) for w in heldout.windows)


def test_without_a_held_out_fraction_training_keeps_every_window():
    assert evaluate.split(_dataset(100), SEQ, val_fraction=0.0, val_path=None) == (100, None)


def test_the_evaluation_batches_are_the_first_held_out_windows_in_order_and_full_where_they_can_be():
    _, heldout = evaluate.split(_dataset(100), SEQ, val_fraction=0.1, val_path=None)
    batches = heldout.batches(micro_batch=4, eval_batches=8)
    assert [len(x) for x, _ in batches] == [4, 4]
    assert (batches[1][0][0] == heldout.tokens[94 * SEQ:95 * SEQ]).all()
    assert [len(x) for x, _ in heldout.batches(micro_batch=16, eval_batches=8)] == [10]  # short: none is full
    again = heldout.batches(micro_batch=4, eval_batches=8)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(batches, again))
    assert len(heldout.batches(micro_batch=4, eval_batches=2)) == 2


def test_val_loss_is_the_mean_cross_entropy_over_every_held_out_token():
    torch.manual_seed(0)
    args = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1).args(vocab_size=VOCAB, max_seq_len=SEQ)
    model = Transformer(args, standard_attention)
    _, heldout = evaluate.split(_dataset(100), SEQ, val_fraction=0.1, val_path=None)
    batches = heldout.batches(micro_batch=3, eval_batches=8)
    out = evaluate.summary(*evaluate.loss_sums(model, batches, device=torch.device("cpu"), dtype=torch.float32))
    x = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    y = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    with torch.no_grad():
        logits, _ = model(x, y)
    expected = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1)).item()
    assert out["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert out["val_tokens"] == 9 * SEQ and len(out["val_batch_losses"]) == 3
    assert out["val_ppl"] == pytest.approx(np.exp(expected), rel=1e-6)


def _prepare(tmp_path, overrides):
    return prepare(TrainOptions(config_file=str(write_config(tmp_path / "c.yaml", overrides)),
                                output_dir=str(tmp_path / "runs")))


def test_the_default_holds_out_a_tenth_of_the_data(tmp_path):
    assert _prepare(tmp_path, {}).cfg.data.held_out_fraction == 0.1


def test_val_fraction_and_val_path_together_are_refused_naming_both(tmp_path):
    with pytest.raises(UsageError, match="data.val_fraction or data.val_path, not both"):
        _prepare(tmp_path, {"data": {"val_fraction": 0.2, "val_path": str(tmp_path)}})


def test_evaluation_without_held_out_data_is_refused_before_launch(tmp_path):
    with pytest.raises(UsageError, match="train.eval_every 100 needs held-out data, but data.val_fraction is 0"):
        _prepare(tmp_path, {"data": {"val_fraction": 0}, "train": {"eval_every": 100}})
    assert _prepare(tmp_path, {"data": {"val_fraction": 0}, "train": {"eval_every": 0}}).val_source is None
