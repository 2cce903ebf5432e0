"""The node probe without Ray: ELF reading, imports in a child, the whole probe as a child process."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from orchestrator.preflight import elf, rules
from orchestrator.preflight.settings import ProbeSettings
from orchestrator.preflight.child import parse_probe, probe_command, probe_env, run_probe
from orchestrator.preflight.probe import check_import
from trainer.attention import AttentionShape
from trainer.attention.cache import glibc_version
from tests.preflight_fakes import IMPORT_ERRORS, fake_flash_attn, fake_flash_attn_4_only, import_failing, patched_so


def test_elf_reads_the_glibc_needs_of_a_real_extension_without_loading_it():
    needs = elf.required_versions(torch._C.__file__)
    assert needs["GLIBC"] and elf.version_key(needs["GLIBC"]) <= elf.version_key(glibc_version())


def test_elf_reads_what_the_loaded_libstdcxx_provides():
    libstdcxx = next(Path(p.split()[-1]) for p in Path("/proc/self/maps").read_text().splitlines()
                     if "libstdc++.so" in p)
    assert elf.version_key(elf.provided_versions(libstdcxx)["GLIBCXX"]) >= (3, 4, 19)


def test_elf_sees_a_patched_need_for_a_glibc_no_machine_has(tmp_path):
    so = patched_so(tmp_path / "fake.so")
    assert elf.required_versions(so)["GLIBC"] == "9.9.9"
    (tmp_path / "notelf.so").write_text("hello")
    with pytest.raises(ValueError, match="not an ELF file"):
        elf.required_versions(tmp_path / "notelf.so")


@pytest.mark.parametrize("code", sorted(IMPORT_ERRORS))
def test_a_fake_flash_attn_failing_with_a_real_error_is_classified_from_its_child_import(tmp_path, code):
    site = fake_flash_attn(tmp_path, import_failing(IMPORT_ERRORS[code]))
    env = dict(os.environ, PYTHONPATH=str(site))
    outcome = check_import("flash_attn", timeout_s=30, env=env)
    assert not outcome["ok"] and IMPORT_ERRORS[code] in outcome["error"]
    assert rules.classify(outcome["error"]).code == code


def test_a_segfaulting_import_is_reported_with_its_signal(tmp_path):
    site = fake_flash_attn(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    outcome = check_import("flash_attn", timeout_s=30, env=dict(os.environ, PYTHONPATH=str(site)))
    assert outcome["signal"] == "SIGSEGV" and not outcome["ok"]


def test_the_flash_attn_imports_start_first_and_report_their_own_seconds(tmp_path, monkeypatch):
    """Each import runs in a child of its own (seconds for flash-attn-4), started before the
    probe's own work (torch's import, CUDA's start, node health) so that it runs beside it; the
    seconds recorded are the import's, however late the probe reads its outcome."""
    from orchestrator.preflight import probe

    site = fake_flash_attn(tmp_path, "import time\ntime.sleep(1.0)\ndef flash_attn_func(q, k, v, causal=False): ...\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    calls = []
    start_import, torch_facts = probe.start_import, probe.torch_facts
    monkeypatch.setattr(probe, "start_import", lambda *a, **k: calls.append("import started") or start_import(*a, **k))
    monkeypatch.setattr(probe, "torch_facts", lambda: calls.append("torch facts") or time.sleep(2.0) or torch_facts())
    shape = AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2)
    facts = probe.gather(probe.build_parser().parse_args(["--shape", shape.to_json()]))
    assert calls == ["import started", "torch facts"]
    [imp] = facts["flash_attn"]["imports"]
    assert imp["ok"] and 1.0 <= imp["seconds"] < 2.0  # read after torch facts' 2 s, the import's own 1 s


def _probe(settings, site, tmp_path):
    env = probe_env(settings.disable_flash_attn, dict(os.environ, PYTHONPATH=str(site)))
    facts, issue = parse_probe(run_probe(probe_command(settings), 120, env), 120)
    assert issue is None, issue
    return facts


def test_probe_reports_every_check_on_a_gpu_less_node_with_a_broken_flash_attn(tmp_path):
    site = fake_flash_attn(tmp_path, import_failing(IMPORT_ERRORS["glibc_too_old"]), with_so=True)
    facts = _probe(ProbeSettings(shape=AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2)), site, tmp_path)
    assert facts["glibc"] == glibc_version() and facts["python"] and facts["torch"]["version"] == torch.__version__
    assert facts["gpus"] == [] and facts["libstdcxx"]["GLIBCXX"]
    [dist] = facts["flash_attn"]["distributions"]
    assert (dist["name"], dist["version"], dist["requires"]["GLIBC"]) == ("flash_attn", "2.7.4.post1", "9.9.9")
    [imp] = facts["flash_attn"]["imports"]
    assert imp["module"] == "flash_attn" and "GLIBC_2.32" in imp["error"]
    assert facts["kernels"]["sdpa_flash_cpu"]["ok"]
    assert facts["check"] == {"device": "cpu", "dtype": "float32", "head_dim": 16, "n_heads": 4, "n_kv_heads": 2}
    v = rules.verdict(facts)
    assert [(i.check, i.cause.code) for i in v.issues] == [
        ("ELF of flash_attn 2.7.4.post1", "glibc_too_old"), ("import flash_attn", "glibc_too_old")]


def test_probe_with_flash_disabled_reads_metadata_but_never_imports_flash_attn(tmp_path):
    marker = tmp_path / "imported"
    site = fake_flash_attn(tmp_path / "site", f"open({str(marker)!r}, 'w').write('x')\n")
    facts = _probe(ProbeSettings(disable_flash_attn=True), site, tmp_path)
    assert not marker.exists()
    assert facts["flash_attn"]["disabled"] and facts["flash_attn"]["distributions"][0]["version"] == "2.7.4.post1"
    assert all(i.get("skipped") for i in facts["flash_attn"]["imports"])
    assert rules.verdict(facts).reason == "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"


def test_probe_child_honours_disable_flash_attn_through_the_import_guard(tmp_path):
    marker = tmp_path / "imported"
    site = fake_flash_attn(tmp_path / "site", f"open({str(marker)!r}, 'w').write('x')\n")
    env = probe_env(True, dict(os.environ, PYTHONPATH=str(site)))
    code = ("import orchestrator.preflight.probe, importlib\n"
            "try:\n    importlib.import_module('flash_attn')\nexcept ImportError as e:\n    print('blocked', e)\n")
    out = run_probe([sys.executable, "-c", code], 60, env)
    assert out["stdout"].startswith("blocked") and not marker.exists()


@pytest.mark.parametrize("code,expected", [
    ("import time; time.sleep(60)", "hang"),
    ("import os; os.abort()", "crash"),
    ("print('not facts')", "probe_garbage"),
])
def test_run_probe_bounds_and_reports_a_bad_probe(code, expected):
    raw = run_probe(["python", "-c", code], timeout_s=2)
    assert raw["seconds"] < 30
    facts, issue = parse_probe(raw, 2)
    assert facts is None and issue.cause.code == expected


def test_a_timed_out_probe_takes_its_children_with_it(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    run_probe(["python", "-c", code], timeout_s=3)
    pid = int(pidfile.read_text())
    for _ in range(50):  # the grandchild was SIGKILLed with its group; give the kernel a moment
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {pid} still running")


def test_a_flash_attn_4_only_install_is_a_normal_install_not_an_issue(tmp_path):
    site = fake_flash_attn_4_only(tmp_path / "site")
    facts = _probe(ProbeSettings(shape=AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2)), site, tmp_path)
    imports = {i["module"]: i for i in facts["flash_attn"]["imports"]}
    assert imports["flash_attn.cute"]["ok"]
    assert "no flash_attn_func" in imports["flash_attn"]["skipped"] and "error" not in imports["flash_attn"]
    assert [d["name"] for d in facts["flash_attn"]["distributions"]] == ["flash-attn-4"]
    v = rules.verdict(facts)
    assert v.flash_ok and v.issues == []


def test_an_fa2_less_namespace_error_text_is_classified_as_not_installed_not_unknown():
    cause = rules.classify("AttributeError: module 'flash_attn' has no attribute 'flash_attn_func'")
    assert cause.code == "not_installed" and "flash-attn-4" in cause.summary


def test_probe_times_every_kernel_that_passed_at_the_run_shape_and_caches_the_choice(tmp_path, monkeypatch):

    from orchestrator.preflight import probe
    from trainer.attention import cache, choice

    # Two kernels pass on this CPU: the fused one and (standing in for a second fused kernel) standard.
    monkeypatch.setattr(choice, "flash_candidates", lambda device: ["sdpa_flash_cpu", "standard"])
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    shape = AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2, seq_len=32, micro_batch=2)
    settings = probe.build_parser().parse_args(["--shape", shape.to_json()])
    check, results, selection = probe.kernel_checks(settings, [], disabled=False)
    assert set(selection["timings"]) == {"sdpa_flash_cpu", "standard"}
    assert selection["kernel"] == min(selection["timings"], key=selection["timings"].get)
    assert selection["shape"]["seq_len"] == 32 and selection["shape"]["compile"] is False
    assert len(list(tmp_path.rglob("*.json"))) == 1  # the workers on this node read it
    facts = {"flash_attn": {}, "kernels": results, "kernel_selection": selection}
    assert rules.verdict(facts).flash_kernel == selection["kernel"]


def test_the_probe_times_the_kernels_in_the_runs_whole_blocks_its_mlp_width_and_checkpointing(tmp_path, monkeypatch):
    """The driver's settings carry the model's MLP width and train.activation_checkpointing to
    the probe's command line, and the probe times the kernels in such blocks."""
    from orchestrator import config as config_mod
    from orchestrator.preflight import probe
    from orchestrator.preflight.settings import settings_for
    from trainer.attention import cache, choice
    from trainer.attention import timing as kernel_select

    cfg = config_mod.validate({"model": {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2},
                               "train": {"seq_len": 32, "micro_batch_size": 2, "activation_checkpointing": True}})
    settings = settings_for(cfg, config_mod.variant_configs(cfg, False), False)
    assert (settings.shape.ffn_hidden, settings.shape.activation_checkpointing) == (192, 1)  # 8/3 x 64, rounded to 64
    argv = probe_command(settings)
    told = json.loads(argv[argv.index("--shape") + 1])
    assert told["ffn_hidden"] == 192 and told["activation_checkpointing"] == 1

    monkeypatch.setattr(choice, "flash_candidates", lambda device: ["sdpa_flash_cpu", "standard"])
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    timed = []
    real = kernel_select.block_timer
    monkeypatch.setattr(kernel_select, "block_timer", lambda shape, device, **kw: timed.append(shape) or real(shape, device, **kw))
    _, _, selection = probe.kernel_checks(probe.build_parser().parse_args(argv[3:]), [], disabled=False)
    assert selection["shape"]["ffn_hidden"] == 192 and selection["shape"]["activation_checkpointing"] == 1
    assert kernel_select.timed_blocks(timed[0]) == 2 and set(selection["timings"]) == {"sdpa_flash_cpu", "standard"}
