"""`--run-both-models` with flash attention switched off, as our users' guide shows it:
both variants train with standard attention, side by side, and nothing imports flash-attn."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, write_config
from tests.preflight_fakes import fake_flash_attn

DISABLED = "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"
STARTUP_LINE = "Flash Attention is disabled - will use standard attention implementation"


def _recording_flash_attn(tmp_path):
    """An installed flash_attn (with dist-info, so the probe sees it) that records the pid of
    every process importing it."""
    record = tmp_path / "flash_attn_imports.txt"
    site = fake_flash_attn(tmp_path / "site", f"import os\nopen({str(record)!r}, 'a').write(f'{{os.getpid()}}\\n')\n")
    return site, record


def _train(tmp_path, cli_env, args, env=None):
    site, record = _recording_flash_attn(tmp_path)
    env = {**cli_env, **(env or {}), "PYTHONPATH": f"{site}:{cli_env['PYTHONPATH']}"}
    out = run_cli(["train", "--run-both-models", "--max-steps", "10", "--output-dir", str(tmp_path / "runs"),
                   "--name", "both", *args], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "runs" / "both"
    return out, json.loads((run_dir / "summary.json").read_text()), run_dir, record


def _assert_all_standard(summary, record):
    for name, v in summary["variants"].items():
        assert (v["status"], v["backend"], v["reason"]) == ("succeeded", "standard", DISABLED), name
        assert v["env"] == {"ATTN_IMPL": "standard", "DISABLE_FLASH_ATTN": "1"}
        assert len(v["workers"]) == v["num_workers"] == 1
        for w in v["workers"]:
            assert w["env"]["DISABLE_FLASH_ATTN"] == "1" and w["flash_attn_imports_blocked"], (name, w)
    assert not record.exists(), f"processes imported flash_attn: {record.read_text()}"


@pytest.mark.ray
def test_run_both_models_with_disable_flash_attn_trains_both_with_standard_attention(tmp_path, cli_env):
    cfg = write_config(tmp_path / "tiny.yaml", {"scaling": {"num_workers": 1}})
    out, summary, run_dir, record = _train(tmp_path, cli_env, ["--disable-flash-attn", "--config-file", str(cfg)])
    assert STARTUP_LINE in out.stdout
    assert list(summary["variants"]) == ["flash", "standard"]
    assert [v["attention"] for v in summary["variants"].values()] == ["flash", "standard"]  # the requests
    _assert_all_standard(summary, record)
    report = (run_dir / "report.md").read_text()
    assert "so no flash/standard speed ratio is claimed" in report
    assert "- flash vs standard: OK: max relative difference" in report and "](loss.png)" in report


@pytest.mark.ray
def test_disable_flash_attn_variable_applies_to_the_configs_two_model_variants(tmp_path, cli_env):
    """DISABLE_FLASH_ATTN=1 in the driver's environment and a config listing a baseline and a
    deeper model: --run-both-models runs those two, both with standard attention."""
    cfg = write_config(tmp_path / "two-models.yaml", {
        "scaling": {"num_workers": 1},
        "variants": [{"name": "baseline", "attention": "flash"},
                     {"name": "deeper", "attention": "flash", "model": {"n_layers": 3}}]})
    out, summary, run_dir, record = _train(tmp_path, cli_env, ["--config-file", str(cfg)], {"DISABLE_FLASH_ATTN": "1"})
    assert "DISABLE_FLASH_ATTN=1 is set: flash attention disabled" in out.stdout
    assert STARTUP_LINE in out.stdout
    assert list(summary["variants"]) == ["baseline", "deeper"]
    _assert_all_standard(summary, record)
    baseline, deeper = summary["variants"]["baseline"], summary["variants"]["deeper"]
    assert deeper["params"] > baseline["params"]
    report = (run_dir / "report.md").read_text()
    assert "no flash/standard speed ratio is claimed" in report
    assert "baseline and deeper override different model/train settings" in report
