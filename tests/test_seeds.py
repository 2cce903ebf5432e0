"""``train --seeds K`` (issue 33): each variant trained K times as runs of its own, and the report's
held-out verdict on the mean over seeds with their spread; on canned per-seed results."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from orchestrator import comparison, config, heldout, seeds, trained
from orchestrator.errors import UsageError
from orchestrator.run import effective_options
from orchestrator.options import TrainOptions
from orchestrator.results import RunInfo, RunSummary, VariantResult, read_summary, seed_group

HARDNESS = [4.1, 5.3, 4.7, 5.9, 4.4, 5.0, 5.6, 4.9]  # batches differ far more than the models


def _evals(offset: float, steps=(10, 20)) -> list[dict]:
    """One run's metrics records: training losses and, at ``steps``, every held-out batch ``offset`` off."""
    recs = []
    for s in range(1, steps[-1] + 1):
        rec = {"step": s, "loss": 7.0 - 0.01 * s + offset, "tokens": s * 1000, "tokens_per_s": 1000.0,
               "step_time_s": 0.1}
        if s in steps:
            batches = [h + offset - 0.01 * s for h in HARDNESS]
            rec.update(val_loss=statistics.fmean(batches), val_batch_losses=batches, val_tokens=256 * len(batches))
        recs.append(rec)
    return recs


def _verdict(a_offsets, b_offsets) -> heldout.Verdict:
    return heldout.compare("a", "b", [_evals(o) for o in a_offsets], [_evals(o) for o in b_offsets])[0]


# ---------------------------------------------------------------- the runs of a variant


def test_one_seed_leaves_the_variants_and_their_names_as_they_are():
    cfg = config.RunConfig()
    both = config.variant_configs(cfg, True, False)
    assert seeds.expand(cfg, both, 1) == (both, {})


def test_k_seeds_make_k_runs_per_variant_with_consecutive_seeds_from_each_variants_own():
    cfg = config.validate({"train": {"seed": 7}, "variants": [
        {"name": "baseline", "attention": "flash"},
        {"name": "deeper", "attention": "flash", "model": {"n_layers": 6}, "train": {"seed": 100}}]})
    runs, groups = seeds.expand(cfg, config.variant_configs(cfg, True, False), 3)
    assert groups == {"baseline": {"baseline-s1": 7, "baseline-s2": 8, "baseline-s3": 9},
                      "deeper": {"deeper-s1": 100, "deeper-s2": 101, "deeper-s3": 102}}
    assert [(v.name, config.resolved_sections(cfg, v)[1].seed, config.resolved_sections(cfg, v)[0].n_layers)
            for v in runs] == [("baseline-s1", 7, 4), ("baseline-s2", 8, 4), ("baseline-s3", 9, 4),
                               ("deeper-s1", 100, 6), ("deeper-s2", 101, 6), ("deeper-s3", 102, 6)]


@pytest.mark.parametrize("k", [0, -2])
def test_seeds_below_one_are_a_usage_error_naming_the_flag(k):
    with pytest.raises(UsageError, match=rf"^--seeds {k}: must be at least 1"):
        seeds.expand(config.RunConfig(), config.variant_configs(config.RunConfig(), False), k)


def test_a_variant_named_like_another_variants_run_is_refused():
    cfg = config.validate({"variants": [{"name": "a", "attention": "flash"}, {"name": "a-s2", "attention": "flash"}]})
    with pytest.raises(UsageError, match="a variant is already named a-s2; rename it"):
        seeds.expand(cfg, config.variant_configs(cfg, False), 2, "two.yaml")


def test_export_and_generate_find_each_run_of_a_seeded_run(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": 3}}))
    (tmp_path / "options.json").write_text(json.dumps({"run_both_models": True, "seeds": 2}))
    _, variants = trained.run_variants(tmp_path)
    assert [v.name for v in variants] == ["flash-s1", "flash-s2", "standard-s1", "standard-s2"]
    assert variants[1].train == {"seed": 4}


# ---------------------------------------------------------------- the verdict over seeds


def test_a_difference_beyond_the_seeds_spread_is_named_with_the_combined_uncertainty():
    v = _verdict([0.0, 0.04, -0.04], [0.3, 0.34, 0.26])
    assert v.outcome == "better"
    # std over seeds 0.04 in each; the paired batches agree exactly, so the seeds alone give the error.
    assert v.stderr == pytest.approx((2 * 0.04 ** 2 / 3) ** 0.5)
    assert v.text == ("a is better than b by 0.3000 ± 0.0327 held-out loss at step 20 (20,000 tokens) (means over "
                      "3 seeds each, ± one standard error from the spread over seeds and 8 paired batches)")


def test_a_difference_within_the_seeds_spread_is_no_difference_though_one_seed_each_would_call_it():
    one_seed = _verdict([0.0], [0.1])
    assert one_seed.outcome == "better" and one_seed.text.startswith("a is better than b by 0.1000")
    v = _verdict([0.0, 0.2, -0.2], [0.1, 0.3, -0.1])
    assert v.outcome == "no difference"
    assert v.text.startswith("no difference within noise between a and b at step 20 (20,000 tokens): -0.1000 ± 0.1633")


def test_one_model_trained_twice_per_seed_with_the_same_seeds_shows_no_difference():
    v = _verdict([0.0, 0.05], [0.0, 0.05])
    assert v.outcome == "no difference" and v.diff == 0


def test_a_variant_with_one_run_left_gets_no_verdict_over_seeds():
    v = _verdict([0.0, 0.05], [0.3])
    assert v.outcome == "not compared" and "only one run of b got there" in v.text


def test_the_runs_are_compared_at_the_last_step_every_one_of_them_evaluated():
    v = heldout.compare("a", "b", [_evals(0.0, (10, 20)), _evals(0.01, (10,))], [_evals(0.3), _evals(0.31)])[0]
    assert v.step == 10 and "at step 10 (10,000 tokens)" in v.text


# ---------------------------------------------------------------- summary.json and the report


def _variant(attention: str, recs: list[dict], seed_offset: float) -> dict:
    evals = [r for r in recs if "val_loss" in r]
    return {"status": "succeeded", "attention": attention, "backend": "sdpa_flash_cpu" if attention == "flash" else
            "standard", "steps": recs[-1]["step"], "first_loss": recs[0]["loss"], "final_loss": recs[-1]["loss"],
            "final_val_loss": evals[-1]["val_loss"], "best_val_loss": min(r["val_loss"] for r in evals),
            "best_val_step": evals[-1]["step"], "num_workers": 1, "use_gpu": False, "dtype": "float32",
            "tokens_per_step": 1000, "params": 1000, "tokens_per_s": 1000.0 + seed_offset}


def _seeded_run(tmp_path, offsets: dict[str, list[float]]):
    """A run directory of --run-both-models --seeds K, each run's losses offset by its seed."""
    d = tmp_path / "run"
    variants, groups = {}, {}
    for group, group_offsets in offsets.items():
        groups[group] = {f"{group}-s{i + 1}": 1337 + i for i in range(len(group_offsets))}
        for name, offset in zip(groups[group], group_offsets):
            recs = _evals(offset)
            (d / name).mkdir(parents=True)
            (d / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            variants[name] = VariantResult(**_variant(group, recs, offset))
    summary = RunSummary(run=RunInfo(name="run", dir=str(d), status="succeeded", mode="concurrent"), variants=variants,
                         seed_groups={g: seed_group(runs, variants) for g, runs in groups.items()})
    summary.settle().write(d)
    return d


def test_summary_records_each_variants_runs_and_the_mean_and_std_of_their_held_out_loss(tmp_path):
    d = _seeded_run(tmp_path, {"flash": [0.0, 0.1], "standard": [0.0, 0.1]})
    saved = json.loads((d / "summary.json").read_text())["seed_groups"]
    final = [statistics.fmean(HARDNESS) - 0.2, statistics.fmean(HARDNESS) - 0.1]
    assert saved["flash"] == {"variants": ["flash-s1", "flash-s2"], "seeds": [1337, 1338], "succeeded": 2, "step": 20,
                              "final_val_loss_mean": pytest.approx(statistics.fmean(final)),
                              "final_val_loss_std": pytest.approx(statistics.stdev(final)),
                              "best_val_loss_mean": pytest.approx(statistics.fmean(final)),
                              "best_val_loss_std": pytest.approx(statistics.stdev(final))}
    assert "  flash: held-out 4.8375 ± 0.0707 (mean ± std over 2 seeds, step 20)" in read_summary(d).describe()


def test_report_of_seeded_runs_checks_parity_seed_by_seed_and_gives_each_variant_mean_and_spread(tmp_path):
    d = _seeded_run(tmp_path, {"flash": [0.0, 0.1], "standard": [0.0, 0.1]})
    written = comparison.write(d)
    text = written.path.read_text()
    # Each flash run against the standard run of its own seed: the same weights, the same batches.
    assert [(p.flash, p.standard, p.status) for p in written.parities] == [
        ("flash-s1", "standard-s1", "agree"), ("flash-s2", "standard-s2", "agree")]
    assert "| flash | 2 of 2 succeeded | 1337, 1338 | 4.8375 ± 0.0707 | 4.8375 ± 0.0707 | 20 |" in text
    assert ("- no difference within noise between flash and standard at step 20 (20,000 tokens): +0.0000 ± 0.0707 "
            "held-out loss (flash - standard, means over 2 seeds each") in text
    assert "held-out parity OK" in text
    assert "![val_loss](val_loss.png)" in text and (d / "val_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_seeded_runs_names_the_better_variant_beyond_the_spread(tmp_path):
    d = _seeded_run(tmp_path, {"flash": [0.5, 0.52, 0.48], "standard": [0.0, 0.02, -0.02]})
    [v] = comparison.write(d).verdicts
    assert v.text.startswith("standard is better than flash by 0.5000 ± 0.0163 held-out loss at step 20")


def test_resume_keeps_the_runs_k_seeds(tmp_path):
    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "options.json").write_text(json.dumps({"run_both_models": True, "seeds": 3}))
    _, saved = effective_options(TrainOptions(resume=str(tmp_path)))
    assert saved.options["seeds"] == 3
