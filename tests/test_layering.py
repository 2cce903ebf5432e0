"""The architecture's import rules (pyproject.toml's [tool.importlinter]), checked by import-linter
with the rest of the suite, and shown to fail on a planted violation."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()", "--no-cache"]


def _lint(root) -> subprocess.CompletedProcess:
    return subprocess.run(LINT, cwd=root, env={**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=300)


def test_the_import_contracts_are_kept():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("module, line, broken", [
    ("trainer/step.py", "from orchestrator import results",
     "the worker (trainer) never imports the driver (orchestrator) or bench"),
    ("orchestrator/results.py", "from bench import corpus",
     "the driver never imports bench, but for the CLI's bench command"),
    ("orchestrator/config.py", "from orchestrator import strategy",
     "the driver's data path: each step imports only the steps below it"),
    ("trainer/master_weights.py", "from trainer import optim", "no import circles"),  # optim imports master_weights
])
def test_a_planted_violation_breaks_its_contract(tmp_path, module, line, broken):
    for name in ("orchestrator", "trainer", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}\n")
    done = _lint(tmp_path)
    assert done.returncode == 1 and f"{broken} BROKEN" in done.stdout, done.stdout
