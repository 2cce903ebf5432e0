"""A three-node cluster on one machine (ray.cluster_utils.Cluster), each node with its own labels and
its own environment (a broken flash-attn on the workers' path, or DISABLE_FLASH_ATTN=1):
`preflight --json` probes and judges node by node."""

import json
import os

import pytest

from tests.conftest import ROOT, run_cli
from tests.preflight_fakes import IMPORT_ERRORS, fake_flash_attn, import_failing

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def three_node_cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    sites = {}
    for zone, code in (("a", "glibc_too_old"), ("b", "torch_abi_mismatch")):
        sites[zone] = fake_flash_attn(tmp_path_factory.mktemp(f"site-{zone}"), import_failing(IMPORT_ERRORS[code]))
    env = {z: {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "RAY_USAGE_STATS_ENABLED": "0"} for z, site in sites.items()}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "labels": {"zone": "a"}, "env_vars": env["a"], "include_dashboard": False})
    cluster.add_node(num_cpus=1, labels={"zone": "b"}, env_vars=env["b"])
    # A node whose own environment disables flash attention, as an admin would before `ray start`.
    cluster.add_node(num_cpus=1, labels={"zone": "c"}, env_vars={"DISABLE_FLASH_ATTN": "1", "PYTHONPATH": str(ROOT),
                                                                 "RAY_USAGE_STATS_ENABLED": "0"})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_preflight_probes_each_node_and_classifies_its_own_flash_attn_failure(three_node_cluster, tmp_path, cli_env):
    out = run_cli(["preflight", "--address", three_node_cluster.address, "--json", "--output-dir", "pf"], cli_env,
                  tmp_path, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)  # stdout holds only the JSON report
    assert report == json.loads((tmp_path / "pf" / "preflight.json").read_text()) | {"created": report["created"]}
    by_zone = {n["labels"]["zone"]: n for n in report["nodes"]}
    assert sorted(by_zone) == ["a", "b", "c"] and all(n["cpus"] == 1 for n in report["nodes"])
    disabled = by_zone.pop("c")["verdict"]
    assert (disabled["flash_ok"], disabled["reason"]) == (
        False, "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)")
    expected = {"a": "glibc_too_old", "b": "torch_abi_mismatch"}
    log = (tmp_path / "pf" / "flash_attention_log.txt").read_text()
    for zone, node in by_zone.items():
        verdict = node["verdict"]
        assert [(i["check"], i["code"]) for i in verdict["issues"]] == [("import flash_attn", expected[zone])]
        assert verdict["issues"][0]["error"].endswith(IMPORT_ERRORS[expected[zone]])
        # No GPU: the flash variant would run PyTorch's fused CPU kernel; the broken package is logged.
        assert (verdict["flash_ok"], verdict["flash_kernel"]) == (True, "sdpa_flash_cpu")
        assert node["facts"]["flash_attn"]["distributions"][0]["version"] == "2.7.4.post1"
        assert f"node {node['node_id']} " in log and f"[{expected[zone]}] import flash_attn" in log
    assert "no GPUs in the cluster" in report["notes"][0]
