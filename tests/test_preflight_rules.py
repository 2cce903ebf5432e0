"""Preflight rules on canned facts and real error strings: causes, hints, verdicts, report files."""

import json

import pytest

from orchestrator.preflight import rules
from orchestrator.preflight.settings import ProbeSettings
from trainer.attention import AttentionShape
from orchestrator.preflight.child import parse_probe
from orchestrator.preflight.probe import MARKER, SCHEMA
from orchestrator.plan import nodes_from_preflight
from orchestrator.preflight.findings import NodeReport, PreflightReport
from tests.preflight_fakes import IMPORT_ERRORS, RUN_ERRORS


@pytest.mark.parametrize("code,text", [*IMPORT_ERRORS.items(), *RUN_ERRORS.items()])
def test_each_real_error_string_gets_its_cause_and_a_one_line_hint(code, text):
    cause = rules.classify(f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{text}")
    assert cause.code == code
    assert cause.hint and "\n" not in cause.hint and "\n" not in cause.summary


def test_cause_summaries_name_the_missing_version_or_library():
    assert "GLIBC_2.32" in rules.classify(IMPORT_ERRORS["glibc_too_old"]).summary
    assert "GLIBCXX_3.4.29" in rules.classify(IMPORT_ERRORS["libstdcxx_too_old"]).summary
    assert "libcudart.so.12" in rules.classify(IMPORT_ERRORS["cuda_runtime_mismatch"]).summary
    assert "_ZN3c105Error" in rules.classify(IMPORT_ERRORS["torch_abi_mismatch"]).summary


def test_an_unknown_error_is_unknown_not_a_guess():
    assert rules.classify("ValueError: something else entirely").code == "unknown"


def test_elf_needs_predict_glibc_and_glibcxx_failures_before_importing():
    causes = rules.predicted_by_elf({"GLIBC": "2.32", "GLIBCXX": "3.4.29"}, glibc="2.31", glibcxx="3.4.28")
    assert [c.code for c in causes] == ["glibc_too_old", "libstdcxx_too_old"]
    assert "needs GLIBC_2.32, the node has GLIBC 2.31" in causes[0].summary
    assert rules.predicted_by_elf({"GLIBC": "2.17", "GLIBCXX": "3.4.19"}, glibc="2.35", glibcxx="3.4.30") == []
    # numeric, not string, comparison: 2.4 is older than 2.32
    assert [c.code for c in rules.predicted_by_elf({"GLIBC": "2.32"}, glibc="2.4", glibcxx=None)] == ["glibc_too_old"]


def _gpu_facts(**over):
    facts = {
        "schema": SCHEMA, "hostname": "gpu-1", "glibc": "2.31", "python": "3.10.12",
        "torch": {"version": "2.5.1+cu124", "cuda": "12.4", "cxx11_abi": False, "cuda_available": True},
        "libstdcxx": {"GLIBCXX": "3.4.28"},
        "driver": {"version": "550.54.15", "cuda": "12.4", "source": "nvml"},
        "gpus": [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "memory_bytes": 85899345920}],
        "flash_attn": {"disabled": False,
                       "distributions": [{"name": "flash_attn", "version": "2.7.4", "requires": {"GLIBC": "2.32"}}],
                       "imports": [{"module": "flash_attn", "kernel": "flash_attn_2", "ok": False,
                                    "error": IMPORT_ERRORS["glibc_too_old"]}]},
        "kernels": {"flash_attn_2": {"ok": False, "skipped": "import flash_attn failed"},
                    "sdpa_flash": {"ok": True}, "sdpa_cudnn": {"ok": True}, "sdpa_efficient": {"ok": True}},
    }
    facts.update(over)
    return facts


def test_broken_flash_attn_on_an_a100_falls_to_sdpa_flash_and_logs_the_glibc_cause():
    v = rules.verdict(_gpu_facts())
    assert (v.flash_ok, v.flash_kernel, v.reason) == (True, "sdpa_flash", None)
    assert [(i.check, i.cause.code) for i in v.issues] == [
        ("ELF of flash_attn 2.7.4", "glibc_too_old"), ("import flash_attn", "glibc_too_old")]
    assert v.backends["flash_attn_2"] == {"ok": False, "reason": "import flash_attn failed"}
    assert v.backends["standard"]["ok"]


def test_pre_ampere_gpu_where_no_flash_kernel_passes_gets_standard_with_the_reasons():
    facts = _gpu_facts(gpus=[{"index": 0, "name": "Tesla V100", "capability": "7.0", "memory_bytes": 1}])
    facts["flash_attn"]["imports"] = [{"module": "flash_attn", "kernel": "flash_attn_2", "ok": True}]
    facts["kernels"] = {"flash_attn_2": {"ok": False, "error": RUN_ERRORS["gpu_too_old"]},
                        "sdpa_flash": {"ok": False, "error": RUN_ERRORS["sdpa_kernel_unavailable"]},
                        "sdpa_efficient": {"ok": False, "error": RUN_ERRORS["arch_not_in_build"]}}
    v = rules.verdict(facts)
    assert not v.flash_ok and v.flash_kernel is None
    assert v.reason.startswith("no flash kernel passed: flash_attn_2: gpu_too_old")
    assert {i.cause.code for i in v.issues} >= {"gpu_too_old", "arch_not_in_build", "sdpa_kernel_unavailable"}


def test_a_crashing_flash_attn_import_means_standard_attention_on_that_node():
    facts = _gpu_facts()
    facts["flash_attn"]["imports"] = [{"module": "flash_attn", "kernel": "flash_attn_2", "ok": False,
                                       "signal": "SIGSEGV", "error": "Fatal Python error: Segmentation fault"}]
    v = rules.verdict(facts)
    assert not v.flash_ok and "import flash_attn killed the process (SIGSEGV)" in v.reason
    assert v.issues[-1].cause.code == "crash"


def test_gpus_torch_cannot_use_are_reported_with_the_driver_cause():
    facts = _gpu_facts(torch={"version": "2.5.1+cu124", "cuda": "12.4", "cuda_available": False,
                              "cuda_error": RUN_ERRORS["driver_too_old"]}, kernels={"sdpa_flash_cpu": {"ok": True}})
    v = rules.verdict(facts)
    assert ("torch.cuda", "driver_too_old") in [(i.check, i.cause.code) for i in v.issues]


def test_disabled_flash_attn_gives_standard_with_that_reason():
    facts = _gpu_facts()
    facts["flash_attn"] = {"disabled": True, "distributions": [], "imports": [
        {"module": "flash_attn", "kernel": "flash_attn_2", "ok": False, "skipped": "flash attention disabled"}]}
    facts["kernels"] = {"sdpa_flash": {"ok": False, "skipped": "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"}}
    v = rules.verdict(facts)
    assert (v.flash_ok, v.reason) == (False, "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)")


def test_torch_that_does_not_import_gives_standard_and_the_classified_cause():
    v = rules.verdict({"schema": SCHEMA, "glibc": "2.17", "torch": {"error": IMPORT_ERRORS["glibc_too_old"]},
                       "flash_attn": {"disabled": False, "distributions": [], "imports": []}, "kernels": {}})
    assert not v.flash_ok and v.reason.startswith("torch does not import")
    assert v.issues[0].cause.code == "glibc_too_old"


@pytest.mark.parametrize("raw,code", [
    ({"returncode": None, "stdout": "", "stderr": "", "timed_out": True}, "hang"),
    ({"returncode": -11, "stdout": "", "stderr": "Fatal Python error: Segmentation fault", "timed_out": False}, "crash"),
    ({"returncode": 1, "stdout": "", "stderr": f"Traceback...\n{IMPORT_ERRORS['glibc_too_old']}", "timed_out": False},
     "probe_crashed"),
    ({"returncode": 0, "stdout": "hello\n", "stderr": "", "timed_out": False}, "probe_garbage"),
    ({"returncode": 0, "stdout": MARKER + "{not json\n", "stderr": "", "timed_out": False}, "probe_garbage"),
    ({"returncode": 0, "stdout": MARKER + '{"schema": 999}\n', "stderr": "", "timed_out": False}, "probe_garbage"),
])
def test_a_probe_that_hangs_crashes_or_prints_garbage_is_reported_as_such(raw, code):
    facts, issue = parse_probe(raw, timeout_s=5)
    assert facts is None and issue.cause.code == code
    if code == "probe_crashed":
        assert "GLIBC_2.32" in issue.cause.summary  # the probe's own error is classified too


def test_probe_output_is_found_among_other_stdout_lines():
    good = {"schema": SCHEMA, "glibc": "2.35"}
    raw = {"returncode": 0, "stdout": f"some library banner\n{MARKER}{json.dumps(good)}\n", "stderr": "",
           "timed_out": False}
    assert parse_probe(raw, 5) == (good, None)


def _report():
    ok = NodeReport("a" * 56, "10.0.0.1", 16, 1, {"gpu": "a100"}, _gpu_facts(), rules.verdict(_gpu_facts()), 4.2)
    hung_issue = rules.Issue("probe", rules.crash_cause("the probe (5 s timeout)", None, True), "")
    hung = NodeReport("b" * 56, "10.0.0.2", 8, 0, {}, None, rules.probe_failed("probe", hung_issue.cause, ""), None)
    return PreflightReport([ok, hung], ProbeSettings(shape=AttentionShape(head_dim=64, n_heads=8, n_kv_heads=2)))


def test_report_table_json_and_log_show_each_node_verdict_cause_and_hint(tmp_path):
    report = _report()
    table = report.table()
    assert table[0].split() == ["node", "GPUs", "CC", "driver", "CUDA", "GLIBC", "torch", "flash-attn", "probe",
                                "health", "verdict", "reason"]
    assert "1x NVIDIA A100-SXM4-80GB" in table[2] and "flash (sdpa_flash)" in table[2] and "glibc_too_old" in table[2]
    assert "standard" in table[3] and "did not finish in time" in table[3]
    json_path, log_path = report.write(tmp_path)
    data = json.loads(json_path.read_text())
    assert data["flash_nodes"] == {"sdpa_flash": ["aaaaaaaa (10.0.0.1)"]}
    issue = data["nodes"][0]["verdict"]["issues"][1]
    assert (issue["check"], issue["code"], issue["error"]) == ("import flash_attn", "glibc_too_old",
                                                               IMPORT_ERRORS["glibc_too_old"])
    log = log_path.read_text()
    assert "[glibc_too_old] import flash_attn: the node's GLIBC is older than the GLIBC_2.32" in log
    assert "fix: install a flash-attn wheel built on an older distro" in log
    assert "      " + IMPORT_ERRORS["glibc_too_old"] in log
    assert f"node {'b' * 56} (?, 10.0.0.2): standard attention: preflight the probe (5 s timeout) did not finish" in log


def test_node_capacities_carry_the_verdict_for_the_planner():
    caps = nodes_from_preflight(_report())
    assert [(c.node_id[:1], c.cpus, c.gpus, c.labels, c.flash_ok, c.flash_kernel) for c in caps] == [
        ("a", 16, 1, {"gpu": "a100"}, True, "sdpa_flash"), ("b", 8, 0, {}, False, None)]
    assert "did not finish" in caps[1].flash_reason
    assert _report().outcome_lines() == ["Flash attention: kernel sdpa_flash on aaaaaaaa (10.0.0.1)",
                                         "Standard attention on bbbbbbbb (10.0.0.2) (see flash_attention_log.txt)"]


def _timed_facts():
    return _gpu_facts(kernel_selection={"kernel": "sdpa_cudnn", "timings": {"sdpa_flash": 5.25, "sdpa_cudnn": 4.5,
                                                                            "sdpa_efficient": 7.0}})


def test_the_kernel_timed_fastest_at_the_run_shape_wins_over_the_first_in_order(tmp_path):
    v = rules.verdict(_timed_facts())
    assert (v.flash_kernel, v.kernel_timings["sdpa_cudnn"]) == ("sdpa_cudnn", 4.5)
    node = NodeReport("a" * 56, "10.0.0.1", 16, 1, {}, _timed_facts(), v, 4.2)
    report = PreflightReport([node], ProbeSettings(shape=AttentionShape(head_dim=64, n_heads=8, n_kv_heads=2, seq_len=1024)))
    assert report.outcome_lines() == [
        "Flash attention: kernel sdpa_cudnn (4.5 ms/iter), runner-up sdpa_flash (5.25 ms) on aaaaaaaa (10.0.0.1)"]
    assert "flash (sdpa_cudnn, 4.5 ms)" in report.table()[2]
    json_path, _ = report.write(tmp_path)
    timings = json.loads(json_path.read_text())["nodes"][0]["verdict"]["kernel_timings"]
    assert timings == {"sdpa_flash": 5.25, "sdpa_cudnn": 4.5, "sdpa_efficient": 7.0}


def test_a_timed_kernel_that_failed_its_check_is_never_chosen():
    facts = _gpu_facts(kernel_selection={"kernel": "flash_attn_2", "timings": {"flash_attn_2": 1.0}})
    assert rules.verdict(facts).flash_kernel == "sdpa_flash"


def test_standard_attention_timed_fastest_is_the_flash_verdict_and_says_so(tmp_path):
    facts = _gpu_facts(kernel_selection={"kernel": "standard", "timings": {"sdpa_flash": 5.25, "standard": 4.0}})
    v = rules.verdict(facts)
    assert (v.flash_ok, v.flash_kernel) == (True, "standard")
    node = NodeReport("a" * 56, "10.0.0.1", 16, 1, {}, facts, v, 4.2)
    report = PreflightReport([node], ProbeSettings(shape=AttentionShape(head_dim=64, n_heads=8, n_kv_heads=2, seq_len=1024)))
    assert report.outcome_lines() == ["Flash attention: standard attention, timed fastest (4 ms/iter), runner-up "
                                      "sdpa_flash (5.25 ms) on aaaaaaaa (10.0.0.1)"]
    assert "flash (standard: timed fastest, 4 ms)" in report.table()[2]
    assert "flash variant: standard attention, timed fastest at the run's shape" in report.log_text()
