"""The bytecode cache of a local run's processes (orchestrator/bytecode.py): used only where the
packages have no bytecode and the environment forbids writing it; then every process the run
starts keeps its bytecode in the cache, never in the installed packages, and the next process
reads it from there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import bytecode

ROOT = Path(__file__).resolve().parent.parent
NO_WRITE, PREFIX, SWITCH = bytecode.NO_WRITE_ENV, bytecode.PREFIX_ENV, bytecode.BYTECODE_ENV


def test_only_packages_without_bytecode_in_an_environment_that_writes_none_get_the_cache(tmp_path):
    default = tmp_path / "pycache"
    on = {NO_WRITE: "", PREFIX: str(default)}
    assert bytecode.settings({NO_WRITE: "1"}, bytecode_installed=False, default_dir=default) == on
    # A path in the switch moves the cache.
    assert bytecode.settings({NO_WRITE: "1", SWITCH: "/elsewhere"}, bytecode_installed=False,
                             default_dir=default)[PREFIX] == "/elsewhere"
    # A relative one is made absolute: Ray's processes do not share the command's directory.
    assert bytecode.settings({NO_WRITE: "1", SWITCH: "rel/cache"}, bytecode_installed=False,
                             default_dir=default)[PREFIX] == os.path.abspath("rel/cache")
    for environ, installed in (({}, False),  # Python writes bytecode beside the source as usual
                               ({NO_WRITE: ""}, False),  # empty is unset, for Python too
                               ({NO_WRITE: "1"}, True),  # the install has it: nothing to compile
                               ({NO_WRITE: "1", PREFIX: "/theirs"}, False),  # the user's own prefix stays
                               ({NO_WRITE: "1", SWITCH: "0"}, False)):  # switched off
        assert bytecode.settings(environ, bytecode_installed=installed, default_dir=default) == {}, environ


def _package(root: Path, name: str) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("VALUE = 42\n")
    return pkg


def test_has_bytecode_looks_for_the_packages_compiled_init_without_importing_it(tmp_path, monkeypatch):
    pkg = _package(tmp_path / "site", "nobytecode_pkg")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert not bytecode.has_bytecode("nobytecode_pkg")
    assert "nobytecode_pkg" not in sys.modules
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    assert bytecode.has_bytecode("nobytecode_pkg")
    assert bytecode.has_bytecode("no_such_package_here")  # not installed: nothing to compile


def test_the_run_and_the_processes_it_starts_keep_their_bytecode_in_the_cache(tmp_path):
    site = tmp_path / "site"
    pkg = _package(site, "nobytecode_pkg")
    cache = tmp_path / "cache"
    env = {**os.environ, NO_WRITE: "1", SWITCH: str(cache), "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env.pop(PREFIX, None)
    # The driver applies the settings, imports the package itself, then starts a process (as Ray's are).
    code = ("import os, subprocess, sys; from orchestrator import bytecode; "
            "print(sorted(bytecode.apply(package='nobytecode_pkg'))); import nobytecode_pkg.mod; "
            "subprocess.run([sys.executable, '-c', 'import nobytecode_pkg.mod, sys; print(sys.pycache_prefix)'], check=True)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [str(sorted([NO_WRITE, PREFIX])), str(cache)]
    # The cache mirrors the source tree (Python's own layout under a prefix).
    mirrored = cache / pkg.resolve().relative_to(pkg.resolve().anchor)
    assert sorted(p.name for p in mirrored.glob("*.pyc")) == sorted(
        f"{m}.{sys.implementation.cache_tag}.pyc" for m in ("__init__", "mod"))
    assert not (pkg / "__pycache__").exists()  # the installed package is left as it was
    # The next command's processes read it from there: nothing is compiled or written again.
    stamps = {p: p.stat().st_mtime_ns for p in mirrored.glob("*.pyc")}
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in mirrored.glob("*.pyc")} == stamps

    # Switched off, nothing is written anywhere, as PYTHONDONTWRITEBYTECODE asks.
    off = subprocess.run([sys.executable, "-c", code], env={**env, SWITCH: "0"}, capture_output=True, text=True,
                         timeout=120)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split("\n")[:2] == ["[]", "None"]
    assert not (pkg / "__pycache__").exists()



@pytest.mark.ray
def test_a_local_run_where_torch_has_no_bytecode_keeps_its_workers_bytecode_in_the_cache(tmp_path, cli_env):
    # This machine's torch has its bytecode, so the command is told otherwise, as on a machine
    # where torch was installed without it; the rest is the real command, Ray and its workers.
    cache = tmp_path / "pycache"
    env = {**cli_env, NO_WRITE: "1", SWITCH: str(cache)}
    env.pop(PREFIX, None)
    code = ("import sys; from orchestrator import bytecode; bytecode.has_bytecode = lambda package='torch': False; "
            "from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "train", "--max-steps", "2", "--output-dir", str(tmp_path / "runs")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"this run's processes keep theirs in {cache}" in out.stdout + out.stderr
    import torch

    # TorchDynamo is imported by the worker (its model's build on the meta device), never by the driver.
    dynamo = Path(torch.__file__).resolve().parent / "_dynamo"
    assert (cache / dynamo.relative_to(dynamo.anchor) / f"__init__.{sys.implementation.cache_tag}.pyc").is_file()
