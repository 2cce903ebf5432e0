"""The command line as a user meets it: the README's main command and preprocess (bad input: test_bad_input.py)."""

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.ray
def test_train_on_the_embedded_default_under_a_local_ray(tmp_path, cli_env):
    """The README's command: no config, no data, no cluster. A local Ray is started and stopped."""
    out = run_cli(["train", "--max-steps", "12", "--output-dir", str(tmp_path / "runs"), "--name", "readme"],
                  cli_env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "starting a local Ray" in out.stdout
    assert "[flash] step 12/12" in out.stdout
    summary = json.loads((tmp_path / "runs" / "readme" / "summary.json").read_text())
    rec = summary["variants"]["flash"]
    assert rec["status"] == "succeeded" and rec["steps"] == 12
    assert rec["final_loss"] < rec["first_loss"] - 0.5
    assert f"run directory: {tmp_path / 'runs' / 'readme'}" in out.stdout
    assert summary["run"]["status"] == "succeeded"


def test_preprocess_writes_a_dataset_that_train_accepts(tmp_path, cli_env):
    (tmp_path / "t.txt").write_text("hello world, this is a small corpus. " * 200)
    out = run_cli(["preprocess", "--raw-data", "t.txt", "--output-dir", "ds", "--vocab-size", "300"], cli_env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and (tmp_path / "ds" / "meta.json").is_file()
    again = run_cli(["preprocess", "--raw-data", "t.txt", "--output-dir", "ds"], cli_env, tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr
