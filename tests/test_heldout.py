"""The held-out verdict of the comparison report (orchestrator/heldout.py) on canned per-batch
losses (issue 33): which variant is better and by how much, or no difference within noise."""

from __future__ import annotations

import random
import statistics

import pytest

from orchestrator import heldout


def _evals(batch_losses_by_step: dict[int, list[float]], tokens_per_step: int = 1000) -> list[dict]:
    """Metrics records as the worker writes them, with equal-sized batches of 256 tokens."""
    return [{"step": s, "loss": 9.0, "tokens": s * tokens_per_step, "val_loss": statistics.fmean(b),
             "val_batch_losses": b, "val_tokens": 256 * len(b)} for s, b in batch_losses_by_step.items()]


BATCH_HARDNESS = [random.Random(7).uniform(4.0, 6.0) for _ in range(8)]  # batches differ far more than the models


def test_a_clearly_better_model_is_named_with_its_margin_and_uncertainty_at_the_step():
    rng = random.Random(1)
    good = _evals({50: [h - 0.5 + rng.gauss(0, 0.02) for h in BATCH_HARDNESS]})
    bad = _evals({50: [h + rng.gauss(0, 0.02) for h in BATCH_HARDNESS]})
    [v] = heldout.compare("baseline", "deeper", [bad], [good])
    assert v.outcome == "better"
    assert v.text.startswith("deeper is better than baseline by 0.5")
    assert "at step 50 (50,000 tokens)" in v.text
    assert v.diff == pytest.approx(0.5, abs=0.05) and 0 < v.stderr < 0.02


def test_one_model_trained_twice_with_the_same_seed_shows_no_difference():
    run = _evals({25: BATCH_HARDNESS, 50: [h - 0.1 for h in BATCH_HARDNESS]})
    [v] = heldout.compare("a", "b", [run], [[dict(r) for r in run]], parity_rtol=1e-5)
    assert v.outcome == "no difference" and v.step == 50
    assert v.text.startswith("no difference within noise between a and b at step 50")
    assert v.parity.startswith("held-out parity OK")


def test_a_difference_smaller_than_the_batch_noise_is_not_called():
    rng = random.Random(2)
    a = _evals({50: [h + rng.gauss(0, 0.05) for h in BATCH_HARDNESS]})
    b = _evals({50: [h + rng.gauss(0, 0.05) for h in BATCH_HARDNESS]})
    [v] = heldout.compare("a", "b", [a], [b])
    assert v.outcome == "no difference", v.text
    assert abs(v.diff) < 2 * v.stderr


def test_pairing_by_batch_removes_how_hard_each_batch_is():
    """The same 0.01 shift on every batch: significant paired, though batches spread by ~0.5."""
    a = _evals({50: BATCH_HARDNESS})
    b = _evals({50: [h + 0.01 + 0.001 * (i % 2) for i, h in enumerate(BATCH_HARDNESS)]})
    [v] = heldout.compare("a", "b", [a], [b])
    assert v.outcome == "better" and v.text.startswith("a is better than b by 0.01")


def test_flash_and_standard_beyond_the_parity_tolerance_fail_parity():
    a = _evals({50: BATCH_HARDNESS})
    b = _evals({50: [h * 1.01 for h in BATCH_HARDNESS]})
    [v] = heldout.compare("flash", "standard", [a], [b], parity_rtol=1e-3)
    assert v.parity.startswith("held-out parity FAILED: relative difference 9.9")


def test_variants_of_different_tokens_per_step_are_compared_at_equal_steps_and_at_equal_tokens():
    small = _evals({50: BATCH_HARDNESS, 100: [h - 0.2 for h in BATCH_HARDNESS]}, tokens_per_step=1000)
    large = _evals({50: [h - 0.3 for h in BATCH_HARDNESS], 100: [h - 0.4 for h in BATCH_HARDNESS]},
                   tokens_per_step=2000)
    at_step, at_tokens = heldout.compare("small", "large", [small], [large])
    assert "at step 100" in at_step.text and at_step.diff == pytest.approx(0.2)
    assert "at steps 100 and 50 (100,000 tokens)" in at_tokens.text and at_tokens.diff == pytest.approx(0.1)


def test_different_held_out_batches_or_a_single_batch_give_no_verdict():
    [v] = heldout.compare("a", "b", [_evals({50: BATCH_HARDNESS})], [_evals({50: BATCH_HARDNESS[:4]})])
    assert v.outcome == "not compared" and "different held-out batches" in v.text
    [v] = heldout.compare("a", "b", [_evals({50: [5.0]})], [_evals({50: [4.0]})])
    assert v.outcome == "not compared" and "one evaluation batch" in v.text
    [v] = heldout.compare("a", "b", [_evals({50: [5.0, 4.0]})], [[]])
    assert v.outcome == "not compared"
