"""The interconnect preflight (orchestrator/preflight/interconnect.py): which all-reduce checks a
plan needs, how failures are classified, and the real check over gloo on a local Ray, including
an injected hang and an injected NCCL error."""

import json

import pytest

from orchestrator.config import ScalingConfig, VariantConfig
from orchestrator.plan import NodeCapacity, make_plan
from orchestrator.preflight import interconnect as ic
from orchestrator.preflight.findings import PreflightReport
from orchestrator.preflight.settings import ProbeSettings

NODE_A, NODE_B, NODE_C = "a" * 40, "b" * 40, "c" * 40


def test_checks_cover_each_node_and_every_pair_the_plan_spans():
    groups = ic.groups([[NODE_A, NODE_A, NODE_B, NODE_B], [NODE_C]])
    assert [g.name for g in groups] == ["node aaaaaaaa", "node bbbbbbbb", "pair aaaaaaaa - bbbbbbbb"]
    assert [len(g.nodes) for g in groups] == [2, 2, 2]
    assert ic.groups([[NODE_A]]) == []  # one rank: nothing to check


def test_many_nodes_are_checked_as_a_ring_of_pairs():
    nodes = [f"{i:040d}" for i in range(ic.MAX_ALL_PAIRS_NODES + 1)]
    pairs = [g for g in ic.groups([nodes]) if g.kind == "pair"]
    assert len(pairs) == len(nodes)


def test_bus_bandwidth_follows_the_nccl_tests_definition():
    assert ic.bus_bandwidth(10**9, 1.0, 2) == pytest.approx(1.0)
    assert ic.bus_bandwidth(10**9, 0.5, 8) == pytest.approx(2 * 2 * 7 / 8)


@pytest.mark.parametrize("text, code", [
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error (run with NCCL_DEBUG=INFO)", "nccl_system_error"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:144] connect [10.0.0.2]:41234: Connection refused", "unreachable"),
    ("NCCL WARN NET/IB : Got completion with error 12", "infiniband"),
    ("NCCL error: unhandled cuda error, NCCL version 2.21.5", "nccl_cuda_error"),
    ("DistNetworkError: Timed out after 5 seconds waiting for clients. 1/2 clients joined.", "timeout"),
    ("something else entirely", "error"),
])
def test_errors_are_classified_with_a_hint_naming_where(text, code):
    cause = ic.classify(text, timed_out=False, where="pair aaaaaaaa - bbbbbbbb", backend="nccl", timeout_s=30)
    assert cause.code == code and cause.hint
    assert "aaaaaaaa - bbbbbbbb" in cause.summary


def test_a_timeout_is_a_hang_with_the_firewall_and_interface_hint():
    cause = ic.classify(None, timed_out=True, where="node aaaaaaaa", backend="gloo", timeout_s=5)
    assert cause.code == "timeout" and "node aaaaaaaa" in cause.summary and "5 s" in cause.summary
    assert "NCCL_SOCKET_IFNAME" in cause.hint and "firewall" in cause.hint


def _plan(num_workers, nodes, use_gpu):
    return make_plan([VariantConfig(name="flash", attention="flash")],
                     ScalingConfig(num_workers=num_workers, use_gpu=use_gpu), nodes)


def test_auto_checks_gpu_plans_and_skips_a_single_cpu_node():
    cpu = _plan(2, [NodeCapacity(node_id=NODE_A, cpus=4, gpus=0)], False)
    gpu = _plan(2, [NodeCapacity(node_id=NODE_A, cpus=4, gpus=2)], True)
    seen = []

    def runner(group, backend, timeout_s):
        seen.append((group.name, backend))
        return ic.Result(group, backend, "ok", 2**20, 0.001, ic.bus_bandwidth(2**20, 0.001, 2))

    assert ic.check_plan(cpu, setting="auto", timeout_s=5, runner=runner) is None
    assert ic.check_plan(cpu, setting=True, timeout_s=5, runner=runner).results[0].backend == "gloo"
    rep = ic.check_plan(gpu, setting="auto", timeout_s=5, runner=runner)
    assert seen[-1] == ("node aaaaaaaa", "nccl") and rep.failures() == []
    assert ic.check_plan(gpu, setting=False, timeout_s=5, runner=runner) is None


def test_a_failed_check_shows_in_the_preflight_table_json_and_refusal():
    group = ic.Group("pair", (NODE_A, NODE_B))
    cause = ic.classify(None, timed_out=True, where=group.name, backend="nccl", timeout_s=30)
    links = ic.InterconnectReport([ic.Result(ic.Group("node", (NODE_A, NODE_A)), "nccl", "ok", 2**28, 0.002,
                                             ic.bus_bandwidth(2**28, 0.002, 2)),
                                   ic.Result(group, "nccl", "failed", 2**28, cause=cause)])
    report = PreflightReport([], ProbeSettings(), interconnect=links)
    table = "\n".join(report.table())
    assert "node aaaaaaaa" in table and "134.22 GB/s" in table
    assert "FAILED [timeout]" in table and "fix (pair aaaaaaaa - bbbbbbbb)" in table
    data = json.loads(json.dumps(report.to_json()))["interconnect"]
    assert [d["status"] for d in data] == ["ok", "failed"] and data[1]["cause"]["code"] == "timeout"
    msg = ic.failure_message(links)
    assert msg.startswith("interconnect check failed") and "pair aaaaaaaa - bbbbbbbb" in msg and "\n" not in msg


# ---------------------------------------------------------------- real gloo checks on a local Ray


def _local_node(ray):
    return ray.get_runtime_context().get_node_id()


@pytest.mark.ray
def test_gloo_all_reduce_across_two_ranks_reports_bandwidth(ray_session):
    node = _local_node(ray_session)
    rep = ic.run_checks([[node, node]], use_gpu=False, timeout_s=60, nbytes=2**20, iters=2)
    (r,) = rep.results
    assert r.status == "ok" and r.backend == "gloo" and r.busbw_gbps > 0 and r.seconds > 0


@pytest.mark.ray
@pytest.mark.parametrize("fault, code", [("hang", "timeout"), ("error", "nccl_system_error")])
def test_an_injected_fault_is_classified_and_names_the_node(ray_session, monkeypatch, fault, code):
    monkeypatch.setenv(ic.FAULT_ENV, fault)
    node = _local_node(ray_session)
    rep = ic.run_checks([[node, node]], use_gpu=False, timeout_s=5, nbytes=2**20, iters=1)
    (r,) = rep.failures()
    assert r.cause.code == code and f"node {node[:8]}" in r.cause.summary


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="needs two CUDA GPUs")
def test_nccl_all_reduce_across_two_gpus_of_a_node_reports_bus_bandwidth(ray_session):
    node = _local_node(ray_session)
    rep = ic.run_checks([[node, node]], use_gpu=True, timeout_s=120)
    (r,) = rep.results
    assert r.status == "ok", r.to_json()
    assert r.backend == "nccl" and r.busbw_gbps > 1  # NVLink or PCIe, far above a broken link


@pytest.mark.ray
def test_train_refuses_a_plan_whose_interconnect_check_fails_naming_the_node(ray_session, tmp_path, monkeypatch):
    from orchestrator.errors import InfeasibleRequest
    from orchestrator.run import TrainOptions, train
    from tests.conftest import write_config

    cfg = write_config(tmp_path / "check.yaml", {"scaling": {"num_workers": 2, "interconnect_check": True,
                                                              "interconnect_timeout_s": 10}})
    monkeypatch.setenv(ic.FAULT_ENV, "error")
    node = _local_node(ray_session)[:8]
    with pytest.raises(InfeasibleRequest) as e:  # the session's Ray: train() reuses it
        train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs")))
    msg = str(e.value)
    assert msg.startswith("interconnect check failed") and "\n" not in msg
    assert f"node {node}: NCCL hit a system error (node {node}, gloo); fix: " in msg
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing left behind
