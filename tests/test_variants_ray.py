"""Variants on a simulated three-node cluster (ray.cluster_utils.Cluster, all on 127.0.0.1):
a CPU-less head, one node that preflight finds flash-capable and one it does not.

The planner gets each node's flash verdict from its label, as preflight would give it; the
workers record the node they really ran on, which is what the assertions read.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from orchestrator import execute, launch
from orchestrator.errors import EXIT_VARIANT_SKIPPED, UsageError
from orchestrator.plan import PlannedVariant
from orchestrator.run import TrainOptions, train
from tests.conftest import simulated_cluster, write_config
from trainer.config import ModelConfig, TrainConfig
from trainer.worker_spec import WorkerSpec

pytestmark = pytest.mark.ray

FAST = {"train": {"max_steps": 4, "checkpoint_every": 4}}
NO_FLASH_REASON = "flash_attn: undefined symbol; SDPA fused kernel failed its check"


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster({"num_cpus": 2, "labels": {"flash-capable": "yes"}},
                           {"num_cpus": 2, "labels": {"flash-capable": "no"}}) as (_, (flashy, plain)):
        yield SimpleNamespace(flashy=flashy.node_id, plain=plain.node_id)


def cluster_nodes():
    """The alive nodes as the planner sees them, every one flash-capable; the tests below set
    each node's flash verdict themselves instead of probing it."""
    import ray

    from orchestrator.plan import NodeCapacity

    return [NodeCapacity(node_id=n["NodeID"], cpus=n["Resources"].get("CPU", 0.0), gpus=n["Resources"].get("GPU", 0.0),
                         labels={k: v for k, v in (n.get("Labels") or {}).items() if k != "ray.io/node-id"})
            for n in ray.nodes() if n.get("Alive")]


def by_label():
    """Node capacities with preflight's flash verdict read from each node's label."""
    nodes = cluster_nodes()
    for n in nodes:
        n.flash_ok = n.labels.get("flash-capable") == "yes"
        n.flash_reason = None if n.flash_ok else NO_FLASH_REASON
    return nodes


def nowhere():
    nodes = cluster_nodes()
    for n in nodes:
        n.flash_ok, n.flash_reason = False, NO_FLASH_REASON
    return nodes


def everywhere():
    return cluster_nodes()


def _train(tmp_path, name, nodes, overrides=None, **opts):
    cfg = write_config(tmp_path / f"{name}.yaml", {**FAST, **(overrides or {})})
    return train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name, **opts), nodes=nodes)


def _nodes_of(rec):
    return {w["node_id"] for w in rec.workers}


def _overlap(a, b):
    return a.started_at < b.ended_at and b.started_at < a.ended_at


def test_both_variants_run_concurrently_flash_on_the_flash_capable_node(cluster, tmp_path):
    summary = _train(tmp_path, "both", by_label, run_both_models=True)
    flash, standard = summary.variants["flash"], summary.variants["standard"]
    assert summary.run.mode == "concurrent" and summary.run.status == "succeeded"
    assert flash.status == standard.status == "succeeded"
    assert _nodes_of(flash) == {cluster.flashy} and _nodes_of(standard) == {cluster.plain}
    assert flash.backend == "sdpa_flash_cpu" and standard.backend == "standard"
    assert _overlap(flash, standard), "the two fits did not run at the same time"
    plan = json.loads((tmp_path / "runs" / "both" / "plan.json").read_text())
    assert plan["mode"] == "concurrent"
    assert (tmp_path / "runs" / "both" / "report.md").is_file()


def test_variants_that_do_not_fit_together_run_one_after_the_other(cluster, tmp_path):
    """Both variants are held to the flash-capable node by a label selector; its 2 CPUs hold
    one 2-CPU worker at a time."""
    scaling = {"num_workers": 1, "cpus_per_worker": 2, "label_selector": {"flash-capable": "yes"}}
    summary = _train(tmp_path, "seq", everywhere, {"scaling": scaling}, run_both_models=True)
    flash, standard = summary.variants["flash"], summary.variants["standard"]
    assert summary.run.mode == "sequential"
    assert flash.status == standard.status == "succeeded"
    assert _nodes_of(flash) == _nodes_of(standard) == {cluster.flashy}
    assert not _overlap(flash, standard)
    notes = json.loads((tmp_path / "runs" / "seq" / "plan.json").read_text())["notes"]
    assert any("one after the other" in n for n in notes)


def test_flash_that_works_on_no_node_is_skipped_with_its_reason_and_standard_still_runs(cluster, tmp_path):
    # 12 steps: a single 128-token batch's loss is noisy, so 4 steps need not show the fall.
    summary = _train(tmp_path, "skip", nowhere, {"scaling": {"num_workers": 1},
                                                 "train": {"max_steps": 12, "checkpoint_every": 12}},
                     run_both_models=True)
    flash, standard = summary.variants["flash"], summary.variants["standard"]
    assert flash.status == "skipped" and NO_FLASH_REASON in flash.reason
    assert standard.status == "succeeded" and standard.final_loss < standard.first_loss
    assert summary.run.status == "partial"
    assert summary.run.exit_code == EXIT_VARIANT_SKIPPED
    assert f"exit code {EXIT_VARIANT_SKIPPED}: finished, but a requested variant was skipped" in summary.describe()
    on_disk = json.loads((tmp_path / "runs" / "skip" / "summary.json").read_text())
    assert on_disk["variants"]["flash"]["status"] == "skipped"


@pytest.mark.parametrize("overrides,message", [
    # Cluster totals are checked first (capacity.py); per-node packing is test_plan.py's.
    ({"scaling": {"num_workers": 5}}, r"scaling.num_workers 5 x cpus_per_worker 1 needs 5 CPUs; the cluster has 4"),
    ({"scaling": {"use_gpu": True}}, r"scaling.use_gpu true with num_workers 2 needs 2 GPUs; the cluster has 0"),
    ({"scaling": {"label_selector": {"flash-capable": "maybe"}}}, r"label selector \{flash-capable=maybe\} matches none"),
])
def test_a_request_the_cluster_can_never_satisfy_fails_within_seconds_leaving_no_run(cluster, tmp_path, overrides, message):
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=message) as e:
        _train(tmp_path, "never", by_label, overrides)
    assert time.monotonic() - t0 < 30
    assert e.value.exit_code == 2
    assert not (tmp_path / "runs" / "never").exists()


def test_ray_train_gives_up_placing_workers_after_the_placement_timeout(cluster, tmp_path):
    """What the planner cannot see (a node gone since planning): Ray Train must not wait forever."""
    pv = PlannedVariant(name="ghost", attention="flash", env={"ATTN_IMPL": "flash"}, num_workers=1, use_gpu=False,
                        cpus_per_worker=1, label_selector={"ray.io/node-id": "f" * 56})
    spec = WorkerSpec(variant="ghost", model=ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1),
                      train=TrainConfig(max_steps=1), data_path=str(tmp_path / "unused"), out_dir=str(tmp_path / "ghost"))
    t0 = time.monotonic()
    with execute.controller_env({execute.START_TIMEOUT_ENV: "3"}):
        rec = launch.run_variant(pv, spec, max_failures=0, keep_checkpoints=1, placement_timeout_s=3)
    # Starting Ray Train's controller takes seconds of its own (31 s once on a loaded 2-core
    # machine); the error below names the 3 s that gave up.
    assert time.monotonic() - t0 < 60
    assert rec.status == "failed"
    assert "could not place 1 worker(s) x (1 CPU)" in rec.error and "within 3 s" in rec.error
