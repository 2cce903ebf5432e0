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
    assert summary["run"]["command"].startswith("python -m orchestrator train --max-steps 12 ")


@pytest.mark.ray
def test_preprocess_writes_a_dataset_that_train_accepts(tmp_path, cli_env):
    (tmp_path / "t.txt").write_text("hello world, this is a small corpus. " * 200)
    out = run_cli(["preprocess", "--raw-data", "t.txt", "--output-dir", "ds", "--vocab-size", "300"], cli_env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and (tmp_path / "ds" / "meta.json").is_file()
    again = run_cli(["preprocess", "--raw-data", "t.txt", "--output-dir", "ds"], cli_env, tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_disable_flash_attn_in_the_environment_means_the_flag_unless_resuming():
    from orchestrator.cli import build_parser, disable_flash_attn_from_env

    args = build_parser().parse_args(["train"])
    disable_flash_attn_from_env(args, {"DISABLE_FLASH_ATTN": "1"})
    assert args.disable_flash_attn
    args = build_parser().parse_args(["train"])
    disable_flash_attn_from_env(args, {"DISABLE_FLASH_ATTN": "0"})
    assert not args.disable_flash_attn
    args = build_parser().parse_args(["train", "--resume", "runs/r"])  # keeps what the run started with
    disable_flash_attn_from_env(args, {"DISABLE_FLASH_ATTN": "1"})
    assert not args.disable_flash_attn


@pytest.mark.ray
def test_preflight_with_disable_flash_attn_in_the_environment_reports_standard_and_prints_only_json(tmp_path, cli_env):
    out = run_cli(["preflight", "--json", "--output-dir", "pf"], {**cli_env, "DISABLE_FLASH_ATTN": "1"}, tmp_path)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["settings"]["disable_flash_attn"] is True
    [node] = report["nodes"]
    assert node["verdict"]["reason"] == "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"
    assert "DISABLE_FLASH_ATTN=1 is set" in out.stderr
    assert "Flash Attention is disabled" not in out.stdout  # stdout is the JSON alone
    assert json.loads((tmp_path / "pf" / "preflight.json").read_text())["nodes"][0]["node_id"] == node["node_id"]


def test_the_recorded_command_reads_as_typed():
    from orchestrator.run import command_line

    assert command_line(["/src/orchestrator/__main__.py", "train", "--name", "a b"]) == \
        "python -m orchestrator train --name 'a b'"
    assert command_line(["my_script.py", "--fast"]) == "my_script.py --fast"
