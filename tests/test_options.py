"""The train options, made from one table: the CLI's flags, --resume's check and the flag table
of docs/configuration.md (tests/test_docs.py) all follow TrainOptions; and the CLI starts
without torch."""

import subprocess
import sys

import pytest

from orchestrator import cli, options, resume
from orchestrator.errors import UsageError
from tests.conftest import ROOT


def test_parsed_flags_become_the_options_a_script_would_build():
    args = cli.build_parser().parse_args(["train", "--max-steps", "5", "--run-both-models", "--name", "x"])
    assert options.from_args(args) == options.TrainOptions(max_steps=5, run_both_models=True, name="x")


@pytest.mark.parametrize("flag", options.SAVED_OPTIONS.values())
def test_resume_refuses_every_saved_option_given_again(flag):
    args = cli.build_parser().parse_args(["train", "--resume", "r", flag] + ([] if flag in (
        "--disable-flash-attn", "--run-both-models") else ["7"]))
    with pytest.raises(UsageError, match=f"--resume contradicts {flag}"):
        resume.check_flags(options.from_args(args))


def test_the_cli_and_its_help_load_without_torch():
    code = "import sys, orchestrator.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("command", [["train"], ["preflight"]])
def test_a_negative_expect_gpus_is_a_usage_error_before_ray_starts(command, capsys, tmp_path, monkeypatch):
    from orchestrator import session

    def no_ray(*a, **k):  # not ray.is_initialized(): another test may have left a Ray in this process
        raise AssertionError("Ray was started or joined")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(session, "ray_session", no_ray)
    assert cli.main([*command, "--expect-gpus", "-1"]) == 2
    assert capsys.readouterr().err == "error: --expect-gpus -1: must be 0 or more\n"
