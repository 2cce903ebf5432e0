"""Node health on a simulated cluster (ray.cluster_utils.Cluster): each node's probe reads the canned
NVML its own environment names (tests/fake_nvml.py); `train` leaves the node with an uncorrectable
ECC error out of the plan and trains on the other, and `--allow-unhealthy` keeps it."""

import json
import os

import pytest

from tests.conftest import ROOT, run_cli, write_config
from tests.fake_nvml import gpu, node_env

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sick_and_well(tmp_path_factory):
    from ray.cluster_utils import Cluster

    base = {"PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "env_vars": base})
    cluster.add_node(num_cpus=2, labels={"zone": "sick"}, env_vars={**base, **node_env([gpu(0, ecc_volatile=2)])})
    cluster.add_node(num_cpus=2, labels={"zone": "well"}, env_vars={**base, **node_env([gpu(0)])})
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def _train(cluster, tmp_path, cli_env, name, *flags, workers=2):
    cfg = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 3, "checkpoint_every": 3}, "scaling": {
        "num_workers": workers, "cpus_per_worker": 1, "use_gpu": False}})
    out = run_cli(["train", "--address", cluster.address, "--config-file", str(cfg), "--output-dir", str(tmp_path / "runs"),
                   "--name", name, *flags], cli_env, tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    zones = {n["node_id"]: n["labels"].get("zone") for n in json.loads((run / "preflight.json").read_text())["nodes"]}
    ran_on = {zones[w["node_id"]] for v in summary["variants"].values() for w in v["workers"]}
    return out, run, summary, ran_on


def test_an_unhealthy_node_is_left_out_and_the_run_trains_on_the_others(sick_and_well, tmp_path, cli_env):
    out, run, summary, ran_on = _train(sick_and_well, tmp_path, cli_env, "r")
    assert summary["run"]["status"] == "succeeded" and ran_on == {"well"}
    nodes = {n["labels"].get("zone"): n for n in json.loads((run / "preflight.json").read_text())["nodes"]}
    assert nodes["sick"]["health"]["status"] == "unhealthy" and nodes["well"]["health"]["status"] == "healthy"
    [bad] = [c for c in nodes["sick"]["health"]["checks"] if c["status"] == "fail"]
    assert (bad["check"], bad["gpu"], bad["code"]) == ("ecc", 0, "ecc_uncorrected")
    assert nodes["sick"]["health"]["seconds"] is not None
    sick_id = nodes["sick"]["node_id"][:8]
    notes = json.loads((run / "plan.json").read_text())["notes"]
    assert f"node {sick_id} is left out, unhealthy: ecc (GPU 0): uncorrectable ECC errors since boot " \
           "(--allow-unhealthy keeps it)" in notes
    assert "[ecc_uncorrected] ecc (GPU 0): uncorrectable ECC errors since boot" in out.stdout + out.stderr  # the table
    log = (run / "flash_attention_log.txt").read_text()
    assert "health: unhealthy" in log and "fix: drain the node" in log


def test_allow_unhealthy_trains_on_the_unhealthy_node_too(sick_and_well, tmp_path, cli_env):
    # Four workers of one CPU each fit only on both nodes together.
    _, run, summary, ran_on = _train(sick_and_well, tmp_path, cli_env, "kept", "--allow-unhealthy", workers=4)
    assert summary["run"]["status"] == "succeeded" and ran_on == {"sick", "well"}
    assert not any("left out" in n for n in json.loads((run / "plan.json").read_text())["notes"])
