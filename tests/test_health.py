"""Node health (orchestrator/preflight/health.py) on canned NVML readings and canary results: every
cause, every verdict, and what the report, the plan and the interconnect check make of them."""

from __future__ import annotations

import json
import os

import pytest

from orchestrator.config import ScalingConfig, VariantConfig
from orchestrator.errors import InfeasibleRequest
from orchestrator.plan import make_plan, nodes_from_preflight
from orchestrator.preflight import ProbeSettings, health
from orchestrator.preflight.child import parse_probe, probe_command, probe_env, run_probe
from orchestrator.preflight.findings import NodeReport, PreflightReport
from orchestrator.preflight.interconnect import Result, run_checks
from orchestrator.preflight.rules import verdict
from tests.fake_nvml import CannedNVML, gpu, node_env

OK_CANARY = {"gpus": [{"gpu": 0, "sha256": "aa", "tflops": 700.0}, {"gpu": 1, "sha256": "aa", "tflops": 690.0}]}


def facts_with(readings, canary=None, nvml_error=None):
    section = {"canary": canary or {"skipped": "no CUDA GPU: the GEMM canary runs on GPUs only"}, "seconds": 1.5}
    section.update({"nvml_error": nvml_error} if nvml_error else {"gpus": readings})
    return {"health": section}


def problems(h):
    return [(c.check, c.gpu, c.status, c.cause.code) for c in h.problems()]


@pytest.mark.parametrize("overrides, check, status, code", [
    ({"ecc_volatile": 2}, "ecc", "fail", "ecc_uncorrected"),
    ({"ecc_aggregate": 5}, "ecc", "warn", "ecc_history"),
    ({"retired_pending": True}, "memory", "warn", "retired_pending"),
    ({"remapped_pending": True}, "memory", "warn", "remap_pending"),
    ({"remapped_failed": True}, "memory", "fail", "remap_failed"),
    ({"throttle": ["hw_slowdown"]}, "throttle", "fail", "hw_slowdown"),
    ({"throttle": ["power_brake"]}, "throttle", "fail", "hw_slowdown"),
    ({"throttle": ["hw_thermal"]}, "throttle", "warn", "thermal"),
    ({"persistence": False}, "persistence", "warn", "persistence_off"),
    ({"pcie_gen": 3}, "pcie", "warn", "pcie_degraded"),
    ({"pcie_width": 8}, "pcie", "warn", "pcie_degraded"),
    ({"mig": True}, "mig", "fail", "mig_on"),
])
def test_each_nvml_cause_is_named_on_its_gpu_with_a_fix_and_sets_the_verdict(overrides, check, status, code):
    h = health.judge(facts_with([gpu(0), gpu(1, **overrides)]), expected_gpus=2)
    assert problems(h) == [(check, 1, status, code)]
    assert h.status == {"fail": "unhealthy", "warn": "degraded"}[status]
    [bad] = h.problems()
    assert bad.cause.hint and bad.message in h.reason and "GPU 1" in h.reason


def test_a_node_whose_gpus_all_pass_is_healthy_and_every_check_is_recorded():
    h = health.judge(facts_with([gpu(0), gpu(1)], OK_CANARY), expected_gpus=2)
    assert h.status == "healthy" and h.reason is None and h.seconds == 1.5
    checks = {(c["check"], c["gpu"]): c["status"] for c in h.to_json()["checks"]}
    for i in (0, 1):
        for name in ("ecc", "memory", "throttle", "persistence", "pcie", "mig", "gemm"):
            assert checks[(name, i)] == "ok"
    assert checks[("gpu_count", None)] == "ok"


def test_readings_a_gpu_does_not_support_are_skipped_not_failed():
    unsupported = {k: None for k in ("ecc_volatile", "ecc_aggregate", "retired_pending", "remapped_pending",
                                     "remapped_failed", "throttle", "persistence", "pcie_gen", "mig")}
    h = health.judge(facts_with([gpu(0, **unsupported)]), expected_gpus=1)
    assert h.status == "healthy"
    assert {c.check for c in h.checks if c.status == "skip"} >= {"ecc", "memory", "throttle", "persistence", "pcie",
                                                                  "mig", "gemm"}


def test_fewer_gpus_than_expected_makes_the_node_unhealthy():
    h = health.judge(facts_with([gpu(0)]), expected_gpus=8)
    assert problems(h) == [("gpu_count", None, "fail", "gpu_missing")]
    assert "the node has 1 GPU(s) where 8 are expected" in h.reason


def test_no_nvml_is_unhealthy_only_where_gpus_are_expected():
    cpu = facts_with(None, nvml_error="NVMLError_LibraryNotFound: NVML Shared Library Not Found")
    assert health.judge(cpu, expected_gpus=0).status == "healthy"
    assert problems(health.judge(cpu, expected_gpus=4)) == [("nvml", None, "fail", "nvml_unavailable")]


def test_a_gpu_whose_gemm_result_differs_from_the_others_is_unhealthy():
    canary = {"gpus": [{"gpu": i, "sha256": "bad" if i == 2 else "good", "tflops": 700.0} for i in range(4)]}
    h = health.judge(facts_with([gpu(i) for i in range(4)], canary), expected_gpus=4)
    assert problems(h) == [("gemm", 2, "fail", "gemm_mismatch")]
    assert "differs bitwise from the node's other 3 GPUs" in h.reason


def test_two_gpus_that_disagree_with_no_majority_are_both_suspect():
    canary = {"gpus": [{"gpu": 0, "sha256": "x", "tflops": 700.0}, {"gpu": 1, "sha256": "y", "tflops": 700.0}]}
    h = health.judge(facts_with([gpu(0), gpu(1)], canary), expected_gpus=2)
    assert problems(h) == [("gemm", 0, "fail", "gemm_mismatch"), ("gemm", 1, "fail", "gemm_mismatch")]


def test_gpus_of_different_models_are_not_compared_bitwise():
    canary = {"gpus": [{"gpu": 0, "sha256": "x", "tflops": 700.0}, {"gpu": 1, "sha256": "y", "tflops": 690.0}]}
    h = health.judge(facts_with([gpu(0), gpu(1, name="NVIDIA H200")], canary), expected_gpus=2)
    assert h.status == "healthy"


def test_a_gpu_below_90_percent_of_the_nodes_median_tflops_is_a_degraded_straggler():
    canary = {"gpus": [{"gpu": i, "sha256": "s", "tflops": 560.0 if i == 3 else 700.0} for i in range(4)]}
    h = health.judge(facts_with([gpu(i) for i in range(4)], canary), expected_gpus=4)
    assert problems(h) == [("gemm", 3, "warn", "gemm_straggler")]
    assert h.status == "degraded" and "560 TFLOP/s, 80% of the node's median" in h.reason


def test_a_gemm_that_raises_on_a_gpu_is_a_failure_with_its_error():
    canary = {"gpus": [{"gpu": 0, "sha256": "s", "tflops": 700.0},
                       {"gpu": 1, "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}]}
    h = health.judge(facts_with([gpu(0), gpu(1)], canary), expected_gpus=2)
    assert problems(h) == [("gemm", 1, "fail", "gemm_error")] and "illegal memory access" in h.reason


def test_the_canary_is_skipped_on_a_cpu_with_a_reason_and_gather_reads_the_injected_nvml():
    section = health.gather(torch_ok=True, nvml=CannedNVML([gpu(0, ecc_volatile=1)]))
    assert section["canary"] == {"skipped": "no CUDA GPU: the GEMM canary runs on GPUs only"}
    assert section["gpus"][0]["ecc_volatile"] == 1 and section["seconds"] >= 0


def test_the_probe_child_reads_the_nvml_its_nodes_environment_names(tmp_path):
    """The seam end to end: FLASH_ORCH_NVML in the node's environment reaches the probe child."""
    settings = ProbeSettings(disable_flash_attn=True)
    env = probe_env(True, {**os.environ, **node_env([gpu(0), gpu(1, remapped_failed=True)])})
    facts, issue = parse_probe(run_probe(probe_command(settings), 120, env), 120)
    assert issue is None, issue
    h = health.judge(facts, expected_gpus=2)
    assert problems(h) == [("memory", 1, "fail", "remap_failed")] and h.seconds is not None


# ---------------------------------------------------------------- report and plan


def node_report(node_id, readings, gpus=2.0):
    facts = {"schema": 1, "hostname": node_id, "gpus": [], "memory_bytes": 64 * 2**30, **facts_with(readings)}
    return NodeReport(node_id=node_id, address="10.0.0.1", cpus=4.0, gpus=gpus, labels={}, facts=facts,
                      verdict=verdict(facts), health=health.judge(facts, int(gpus)))


def sick_cluster() -> PreflightReport:
    return PreflightReport([node_report("a" * 16, [gpu(0), gpu(1)]),
                            node_report("b" * 16, [gpu(0), gpu(1, ecc_volatile=3)])], ProbeSettings())


def test_the_report_names_an_unhealthy_nodes_cause_and_fix_in_the_table_the_json_and_the_log(tmp_path):
    report = sick_cluster()
    table = "\n".join(report.table())
    assert "healthy" in table.splitlines()[2] and "unhealthy" in table.splitlines()[3]
    assert ("health bbbbbbbb (10.0.0.1) [ecc_uncorrected] ecc (GPU 1): uncorrectable ECC errors since boot; "
            "fix: drain the node") in table
    json_path, log_path = report.write(tmp_path)
    nodes = json.loads(json_path.read_text())["nodes"]
    assert [n["health"]["status"] for n in nodes] == ["healthy", "unhealthy"]
    assert nodes[1]["health"]["seconds"] == 1.5
    [bad] = [c for c in nodes[1]["health"]["checks"] if c["status"] == "fail"]
    assert (bad["check"], bad["gpu"], bad["code"]) == ("ecc", 1, "ecc_uncorrected") and bad["fix"]
    log = log_path.read_text()
    assert "health: unhealthy (1.5 s)" in log and "[ecc_uncorrected] ecc (GPU 1): uncorrectable ECC" in log


def test_the_plan_leaves_an_unhealthy_node_out_and_places_the_run_on_the_others():
    nodes = nodes_from_preflight(sick_cluster())
    plan = make_plan([VariantConfig(name="v", attention="standard")], ScalingConfig(num_workers=2, cpus_per_worker=1,
                                                                                   use_gpu=False), nodes)
    [v] = plan.variants
    assert v.nodes == ["a" * 16] * 2
    assert v.label_selector == {"ray.io/node-id": "a" * 16}  # Ray may not place a worker on the sick node
    assert ("node bbbbbbbb is left out, unhealthy: ecc (GPU 1): uncorrectable ECC errors since boot "
            "(--allow-unhealthy keeps it)") in plan.notes


def test_allow_unhealthy_keeps_the_node_in_the_plan():
    nodes = nodes_from_preflight(sick_cluster(), allow_unhealthy=True)
    plan = make_plan([VariantConfig(name="v", attention="standard")], ScalingConfig(num_workers=8, cpus_per_worker=1,
                                                                                   use_gpu=False), nodes)
    assert set(plan.variants[0].nodes) == {"a" * 16, "b" * 16} and not any("left out" in n for n in plan.notes)


def test_a_cluster_whose_every_node_is_unhealthy_is_refused_naming_each_cause():
    report = PreflightReport([node_report("b" * 16, [gpu(0, mig=True)], gpus=1.0)], ProbeSettings())
    with pytest.raises(InfeasibleRequest, match="every node is left out: node bbbbbbbb unhealthy: mig \\(GPU 0\\): "
                                                "MIG mode is on"):
        make_plan([VariantConfig(name="v", attention="standard")], ScalingConfig(num_workers=1, use_gpu=False),
                  nodes_from_preflight(report))


# ---------------------------------------------------------------- interconnect floors


def fixed_bandwidth(gbps):
    def run(group, backend, timeout_s):
        return Result(group, backend, "ok", 2**28, 0.01, gbps)
    return run


@pytest.mark.parametrize("link, gbps, ok", [("nvlink", 40.0, False), ("nvlink", 350.0, True),
                                            ("pcie", 2.0, False), ("pcie", 20.0, True), (None, 0.5, True)])
def test_a_check_within_a_node_fails_below_its_link_classes_floor_naming_the_node(link, gbps, ok):
    report = run_checks([["n1" * 8, "n1" * 8]], use_gpu=True, timeout_s=10, runner=fixed_bandwidth(gbps),
                        links={"n1" * 8: link})
    [r] = report.results
    assert (r.status == "ok") is ok
    if not ok:
        assert r.cause.code == "slow_interconnect" and f"{gbps:.1f} GB/s across the 2 GPUs of node n1n1n1n1" in \
            r.cause.summary and link in r.cause.summary
        assert r.to_json()["link"] == link


def test_checks_across_nodes_have_no_floor():
    report = run_checks([["a" * 8, "b" * 8]], use_gpu=True, timeout_s=10, runner=fixed_bandwidth(0.1),
                        links={"a" * 8: "nvlink", "b" * 8: "nvlink"})
    assert [r.status for r in report.results] == ["ok"]


def test_link_class_is_nvlink_only_when_every_gpu_has_an_active_link():
    assert health.link_class(facts_with([gpu(0), gpu(1)])) == "nvlink"
    assert health.link_class(facts_with([gpu(0), gpu(1, nvlinks=0)])) == "pcie"
    assert health.link_class({}) is None


def test_a_reused_probe_result_carries_the_health_read_now_not_the_cached_one(tmp_path, monkeypatch):
    """The cache's key holds while a GPU falls sick: a reused result still has this moment's health."""
    from orchestrator.preflight import node

    monkeypatch.setenv("FLASH_ORCHESTRATOR_PREFLIGHT_CACHE", str(tmp_path / "cache"))
    settings = ProbeSettings(disable_flash_attn=True)
    env = probe_env(True, {**os.environ, **node_env([gpu(0)])})
    first = node.probe_or_reuse(probe_command(settings), settings, False, env)
    sick = {**env, **node_env([gpu(0, ecc_volatile=4)])}
    second = node.probe_or_reuse(probe_command(settings), settings, False, sick)
    assert not first["cache"]["reused"] and second["cache"]["reused"]
    assert health.judge(parse_probe(first, 60)[0], 1).status == "healthy"
    assert problems(health.judge(parse_probe(second, 60)[0], 1)) == [("ecc", 0, "fail", "ecc_uncorrected")]


def test_a_new_gpu_check_added_as_docs_preflight_md_says_is_judged_reported_and_leaves_the_node_out(monkeypatch):
    """docs/preflight.md "Adding a health check", followed: a reading, a cause (a failing one), a
    function; the probe's facts carry the reading through the seam, and the verdict, the table and
    the plan name it."""
    def fan(r):
        if r.get("fan_failed") is None:
            return health.Check("fan", r["index"], "skip", "not supported by this GPU or driver")
        return health._found("fan", r["index"], "fan_failed") if r["fan_failed"] else \
            health.Check("fan", r["index"], "ok", "fans spin")

    monkeypatch.setitem(health.CAUSES, "fan_failed", ("a fan has stopped", "replace the fan"))
    monkeypatch.setattr(health, "FAILS", health.FAILS | {"fan_failed"})
    monkeypatch.setattr(health, "GPU_CHECKS", [*health.GPU_CHECKS, fan])
    sick = health.gather(torch_ok=False, nvml=CannedNVML([gpu(0, fan_failed=False), gpu(1, fan_failed=True)]))
    h = health.judge({"health": sick}, expected_gpus=2)
    assert problems(h) == [("fan", 1, "fail", "fan_failed")] and h.status == "unhealthy"
    report = PreflightReport([node_report("a" * 16, [gpu(0), gpu(1)]),
                              node_report("b" * 16, sick["gpus"])], ProbeSettings())
    assert "[fan_failed] fan (GPU 1): a fan has stopped; fix: replace the fan" in "\n".join(report.table())
    plan = make_plan([VariantConfig(name="v", attention="standard")],
                     ScalingConfig(num_workers=2, cpus_per_worker=1, use_gpu=False), nodes_from_preflight(report))
    assert plan.variants[0].nodes == ["a" * 16] * 2
