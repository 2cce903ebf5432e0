"""The comparison report (report.md, charts, loss parity) and the README's --run-both-models
command end to end."""

import json

import pytest

from orchestrator import comparison
from orchestrator.results import RunInfo, RunSummary, VariantResult
from tests.conftest import run_cli, write_config
from trainer.metrics import read_metrics


def _recs(losses, tok=1000.0):
    return [{"step": i + 1, "loss": x, "tokens_per_s": tok, "step_time_s": 0.1} for i, x in enumerate(losses)]


def _variant(attention, backend, final_loss, tokens_per_s, peak, **kw):
    return {"status": "succeeded", "attention": attention, "backend": backend, "env": {"ATTN_IMPL": attention},
            "steps": 12, "first_loss": 7.6, "final_loss": final_loss, "tokens_per_s": tokens_per_s,
            "step_time_s": 4096 / tokens_per_s, "peak_mem_bytes": peak, "peak_mem_kind": "cpu_max_rss",
            "num_workers": 2, "use_gpu": False, "restarts": 0, "error": None, "dtype": "float32",
            "tokens_per_step": 4096, "params": 1000, "workers": [{"node_id": "n" * 56}], **kw}


def _run_dir(tmp_path, flash_losses, standard_losses, skipped=False):
    d = tmp_path / "run"
    variants = {"flash": _variant("flash", "sdpa_flash_cpu", flash_losses[-1], 3000.0, 600 * 2**20),
                "standard": _variant("standard", "standard", standard_losses[-1], 2000.0, 800 * 2**20)}
    if skipped:
        variants["flash"] = {"status": "skipped", "attention": "flash", "reason": "flash attention works on no node",
                             "backend": None, "error": None}
    for name, losses in (("flash", flash_losses), ("standard", standard_losses)):
        if variants[name]["status"] == "succeeded":
            (d / name).mkdir(parents=True)
            (d / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _recs(losses)))
    d.mkdir(exist_ok=True)
    summary = RunSummary(run=RunInfo(name="run", dir=str(d), status="interrupted", mode="concurrent"),
                         variants={n: VariantResult(**r) for n, r in variants.items()})
    summary.settle().write(d)
    return d


LOSSES = [7.6, 7.5, 7.3, 7.1, 7.0, 6.8, 6.7, 6.6, 6.5, 6.4, 6.3, 6.2]


def test_report_has_a_table_per_variant_ratios_parity_and_readable_charts(tmp_path):
    d = _run_dir(tmp_path, LOSSES, [x * (1 + 1e-6) for x in LOSSES])
    written = comparison.write(d)
    text = written.path.read_text()
    assert "| kernel that ran | `sdpa_flash_cpu` | `standard` |" in text
    assert "| tokens/s (steady) | 3,000 | 2,000 |" in text
    assert "| peak memory (rank 0) | 600 MiB | 800 MiB |" in text
    assert "| tokens/s (higher is faster) | 1.500x |" in text and "| peak memory (lower uses less) | 0.750x |" in text
    assert written.parities[0].status == "agree" and "flash vs standard: OK" in text
    assert f"tensorboard --logdir {d}" in text
    for png in ("loss.png", "throughput.png", "memory.png"):
        assert (d / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text


def test_report_of_a_run_with_flash_disabled_claims_no_ratio_and_checks_parity_tightly(tmp_path):
    d = _run_dir(tmp_path, LOSSES, LOSSES)
    reason = "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"
    (d / "plan.json").write_text(json.dumps({"mode": "concurrent", "notes": [], "flash_disabled": reason}))
    written = comparison.write(d)
    text = written.path.read_text()
    assert (f"Flash attention was disabled for all 2 variants ({reason}): every one trained with standard "
            "attention, so no flash/standard speed ratio is claimed.") in text
    assert "higher is faster" not in text
    assert written.parities[0].status == "agree" and "within 1e-05 (float32)" in written.parities[0].detail
    assert "](loss.png)" in text
    # Differences the flash/standard tolerance allows are too large for two runs of one kernel.
    d2 = _run_dir(tmp_path / "off", LOSSES, [x * (1 + 1e-4) for x in LOSSES])
    (d2 / "plan.json").write_text(json.dumps({"mode": "concurrent", "notes": [], "flash_disabled": reason}))
    assert comparison.write(d2).parities[0].status == "diverged"


def test_report_flags_losses_that_diverge_in_the_first_steps(tmp_path):
    drifted = LOSSES[:4] + [x * 1.01 for x in LOSSES[4:]]
    written = comparison.write(_run_dir(tmp_path, drifted, LOSSES))
    p = written.parities[0]
    assert p.status == "diverged" and "at step 5 exceeds 0.001 (float32)" in p.detail
    assert "**DIVERGED**" in written.path.read_text()


def test_bf16_losses_get_the_looser_tolerance():
    a, b = _recs(LOSSES), _recs([x * 1.01 for x in LOSSES])
    assert comparison.check_parity("f", "s", a, b, "bfloat16").status == "agree"
    assert comparison.check_parity("f", "s", a, b, "float32").status == "diverged"


def test_parity_is_not_claimed_for_variants_with_different_settings():
    p = comparison.check_parity("f", "s", _recs(LOSSES), _recs(LOSSES), "float32", not_comparable="f and s differ in num_workers")
    assert p.status == "not checked" and "num_workers" in p.detail


def test_report_of_a_run_whose_flash_was_skipped_says_why_and_has_no_ratios(tmp_path):
    written = comparison.write(_run_dir(tmp_path, LOSSES, LOSSES, skipped=True))
    text = written.path.read_text()
    assert "| status | skipped | succeeded |" in text
    assert "flash attention works on no node" in text and "No ratios" in text
    assert "(exit code 3)" in text


@pytest.mark.ray
def test_report_command_on_a_directory_without_a_run_is_a_usage_error(tmp_path, cli_env):
    out = run_cli(["report", str(tmp_path)], cli_env, tmp_path, timeout=60)
    assert out.returncode == 2 and "no readable summary.json" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.ray
def test_report_command_regenerates_the_report(tmp_path, cli_env):
    d = _run_dir(tmp_path, LOSSES, LOSSES)
    out = run_cli(["report", str(d)], cli_env, tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (d / "report.md").is_file() and "loss parity flash vs standard" in out.stdout


@pytest.mark.ray
def test_run_both_models_on_the_embedded_default_writes_report_plots_and_both_variants(tmp_path, cli_env):
    cfg = write_config(tmp_path / "tiny.yaml", {"scaling": {"num_workers": 1}, "train": {"checkpoint_every": 30}})
    out = run_cli(["train", "--run-both-models", "--max-steps", "30", "--config-file", str(cfg),
                   "--output-dir", str(tmp_path / "runs"), "--name", "both"], cli_env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "plan: 2 variant(s)" in out.stdout and "exit code 0: every variant succeeded" in out.stdout
    run_dir = tmp_path / "runs" / "both"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {n: (r["status"], r["steps"]) for n, r in summary["variants"].items()} == {
        "flash": ("succeeded", 30), "standard": ("succeeded", 30)}
    text = (run_dir / "report.md").read_text()
    assert "flash vs standard: OK" in text
    for png in ("loss.png", "throughput.png", "memory.png"):
        assert (run_dir / png).stat().st_size > 10_000
    # `tensorboard --logdir <run>` shows each variant's own curve: the logged losses, step by step.
    for variant in ("flash", "standard"):
        logged = {r["step"]: r["loss"] for r in read_metrics(run_dir / variant / "metrics.jsonl")}
        assert tensorboard_scalars(run_dir / variant / "tb", "loss") == pytest.approx(logged)
        assert len(logged) == 30


def tensorboard_scalars(tb_dir, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag, read back from the TFRecord event files."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    values = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12: pos + 12 + length])  # after length and its CRC
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = v.simple_value
    return values


@pytest.mark.parametrize("timings, note", [
    ({"sdpa_flash": 4.4, "standard": 3.6}, "flash asked for flash and ran standard attention: it timed fastest"),
    ({}, "flash asked for flash but ran the standard kernel (no fused kernel passed its check"),
])
def test_a_flash_variant_on_standard_attention_says_whether_timing_or_a_fallback_chose_it(tmp_path, timings, note):
    d = _run_dir(tmp_path, LOSSES, LOSSES)
    summary = RunSummary.model_validate_json((d / "summary.json").read_text())
    summary.variants["flash"] = summary.variants["flash"].model_copy(update={"backend": "standard",
                                                                              "kernel_timings": timings})
    summary.write(d)
    text = comparison.write(d).path.read_text()
    assert note in text
    other = ("it timed fastest" if not timings else "no fused kernel passed")
    assert other not in text
