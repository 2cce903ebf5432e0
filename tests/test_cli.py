"""The command line as a user meets it: the README's main command and preprocess (bad input: test_bad_input.py)."""

import json

import pytest
import yaml

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


@pytest.mark.ray
def test_set_reaches_the_runs_config_and_its_workers_and_resume_keeps_it(tmp_path, cli_env):
    from orchestrator.options import TrainOptions
    from orchestrator.run import effective_options, prepare
    from trainer.config import TrainConfig

    sets = ["train.max_steps=2", "train.seq_len=32", "train.lr=3e-4", "scaling.num_workers=1"]
    out = run_cli(["train", "--output-dir", "runs", "--name", "set", *[a for s in sets for a in ("--set", s)]],
                  cli_env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "runs" / "set"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["train"]["max_steps"], saved["train"]["seq_len"], saved["train"]["lr"]) == (2, 32, 3e-4)
    assert saved["scaling"]["num_workers"] == 1
    rec = json.loads((run_dir / "summary.json").read_text())["variants"]["flash"]
    assert (rec["status"], rec["steps"], rec["num_workers"]) == ("succeeded", 2, 1)
    assert rec["tokens_per_step"] == TrainConfig(seq_len=32).tokens_per_step
    resumed, _ = effective_options(TrainOptions(resume=str(run_dir)))
    cfg = prepare(resumed).cfg  # what a resumed run trains with: the run's config.yaml, settings applied
    assert (cfg.train.max_steps, cfg.train.seq_len, cfg.train.lr, cfg.scaling.num_workers) == (2, 32, 3e-4, 1)


@pytest.mark.parametrize("under", ["", "/sub"])
def test_a_cache_home_that_is_a_file_is_a_usage_error_naming_it(tmp_path, monkeypatch, capsys, under):
    from orchestrator import cli

    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file") + under)
    assert cli.main(["report", str(tmp_path)]) == 2
    where = "is a file" if not under else f"is under {tmp_path / 'a-file'}, which is a file"
    assert capsys.readouterr().err == f"error: XDG_CACHE_HOME {tmp_path / 'a-file'}{under}: {where}; expected a directory\n"
