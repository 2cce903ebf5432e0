"""DISABLE_FLASH_ATTN=1 blocks every flash-attn import in the process, even a working one."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT
from trainer.attention import guard


def _fake_flash_attn(tmp_path):
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("IMPORTED = True\n")
    (tmp_path / "flash_attn_interface.py").write_text("IMPORTED = True\n")
    return tmp_path


def _run(code, env_extra, path):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)


CODE = """
    import trainer
    for name in ("flash_attn", "flash_attn_interface", "flash_attn.cute"):
        try:
            __import__(name)
            print(name, "imported")
        except ImportError as e:
            print(name, "blocked:", e)
"""


def test_worker_package_import_blocks_flash_attn_when_disabled(tmp_path):
    out = _run(CODE, {"DISABLE_FLASH_ATTN": "1"}, _fake_flash_attn(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all("blocked" in line for line in lines), lines
    assert "flash attention is disabled in this process (DISABLE_FLASH_ATTN=1)" in lines[0]


def test_flash_attn_imports_normally_when_not_disabled(tmp_path):
    out = _run(CODE, {"DISABLE_FLASH_ATTN": ""}, _fake_flash_attn(tmp_path))
    assert out.stdout.splitlines()[:2] == ["flash_attn imported", "flash_attn_interface imported"]


def test_install_drops_already_imported_modules(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_fake_flash_attn(tmp_path)))
    import flash_attn  # noqa: F401  (the fake one)

    try:
        guard.install()
        assert "flash_attn" not in sys.modules
        try:
            import flash_attn  # noqa: F401,F811
            raise AssertionError("import was not blocked")
        except ImportError as e:
            assert "blocked" in str(e)
    finally:
        guard.uninstall()


def test_unrelated_modules_are_not_blocked():
    assert not guard.is_blocked("flash_attention_utils")
    assert not guard.is_blocked("hopper_tools")
    assert guard.is_blocked("flash_attn_2_cuda")
    assert guard.is_blocked("flash_attn.ops.triton")
