"""The command line as a user meets it: the README's main command, and bad input."""

import json

import pytest

from tests.conftest import run_cli, write_config


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


@pytest.mark.parametrize("args,exit_code,message", [
    (["train", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["train", "--config-file", "missing.yaml"], 2, "missing.yaml: config file not found"),
    (["train", "--preprocessed-data", "nodata"], 2, "nodata: data directory not found"),
    (["train", "--max-steps", "-3"], 2, "train.max_steps: Input should be greater than 0"),
    (["train", "--disable-flash-attn", "--run-both-models"], 2, "contradict each other"),
    (["train", "--config-file", "long.yaml"], 2, "train.seq_len 10000000 is longer than the data"),
    (["train", "--config-file", "vocab.yaml"], 2, "model.vocab_size 100 is smaller than the tokenizer's vocab"),
    (["nonsense"], 2, "invalid choice: 'nonsense'"),
    (["preprocess", "--raw-data", "none.txt", "--output-dir", "o"], 2, "none.txt: no such file or directory"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_directory(tmp_path, cli_env, args, exit_code, message):
    write_config(tmp_path / "long.yaml", {"train": {"seq_len": 10000000}})
    write_config(tmp_path / "vocab.yaml", {"model": {"vocab_size": 100}})
    out = run_cli([*args, "--output-dir", str(tmp_path / "runs")] if args[0] == "train" else args, cli_env, tmp_path,
                  timeout=60)
    assert out.returncode == exit_code, out.stderr
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_existing_run_name_is_refused_and_left_untouched(tmp_path, cli_env):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "summary.json").write_text("{}")
    out = run_cli(["train", "--output-dir", str(tmp_path / "runs"), "--name", "mine"], cli_env, tmp_path, timeout=60)
    assert out.returncode == 2 and "a run with this name exists" in out.stderr
    assert (tmp_path / "runs" / "mine" / "summary.json").read_text() == "{}"


def test_preprocess_writes_a_dataset_that_train_accepts(tmp_path, cli_env):
    (tmp_path / "t.txt").write_text("hello world, this is a small corpus. " * 200)
    out = run_cli(["preprocess", "--raw-data", "t.txt", "--output-dir", "ds", "--vocab-size", "300"], cli_env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and (tmp_path / "ds" / "meta.json").is_file()
    again = run_cli(["preprocess", "--raw-data", "t.txt", "--output-dir", "ds"], cli_env, tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr
