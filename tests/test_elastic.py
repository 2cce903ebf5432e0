"""Elastic runs without Ray: the [min, max] range in the config, the capacity check, the plan
and its memory estimate, and the data order across a resize."""

import pytest

from orchestrator import capacity
from orchestrator.config import ModelConfig, ScalingConfig, TrainConfig, VariantConfig, validate
from orchestrator.errors import UsageError
from orchestrator.plan import NodeCapacity, make_plan
from orchestrator.strategy import Workload
from trainer.dataset import BatchSampler

FLASH = VariantConfig(name="flash", attention="flash")
H100 = 81559 * 2**20
LLAMA3_8B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256,
                        tie_embeddings=False)
SEQ4096 = TrainConfig(seq_len=4096, micro_batch_size=1, activation_checkpointing=True)


@pytest.mark.parametrize("value,message", [
    ([0, 2], "scaling.num_workers: [min, max] needs min at least 1 (got [0, 2])"),
    ([3, 2], "scaling.num_workers: [min, max] needs min at most max (got [3, 2])"),
    ([1, 2, 3], "scaling.num_workers: a range is [min, max], two integers (got [1, 2, 3])"),
])
def test_a_bad_worker_range_is_refused_naming_the_key(value, message):
    with pytest.raises(UsageError) as e:
        validate({"scaling": {"num_workers": value}}, "c.yaml")
    assert str(e.value) == f"c.yaml: {message}"


def test_a_range_round_trips_through_the_saved_config():
    cfg = validate({"scaling": {"num_workers": [1, 3]}})
    assert cfg.scaling.num_workers == (1, 3)
    assert validate(cfg.model_dump(mode="json")).scaling.num_workers == (1, 3)  # what --resume reads


def test_a_min_the_cluster_can_never_hold_is_refused_and_a_max_beyond_it_is_not():
    with pytest.raises(UsageError, match=r"scaling.num_workers \[3, 4\]: min 3 x cpus_per_worker 1 needs 3 CPUs; "
                                         r"the cluster has 2"):
        capacity.check_fits(ScalingConfig(num_workers=[3, 4]), {"CPU": 2}, "c.yaml")
    capacity.check_fits(ScalingConfig(num_workers=[1, 8]), {"CPU": 2}, "c.yaml")


def cpu_nodes(n):
    return [NodeCapacity(node_id=f"n{i}", cpus=1, gpus=0) for i in range(n)]


def test_an_elastic_variant_plans_its_min_and_says_elastic():
    plan = make_plan([FLASH], ScalingConfig(num_workers=[1, 4]), cpu_nodes(2))
    v = plan.variants[0]
    assert (v.num_workers, v.max_workers, v.workers_arg()) == (1, 4, (1, 4))
    assert len(v.nodes) == 1 and v.label_selector is None  # not pinned: it may move and grow
    assert "1-4 x CPU worker(s), elastic" in plan.describe()[1]


def test_elastic_variants_run_one_after_the_other_though_their_mins_fit_together():
    two = [FLASH, VariantConfig(name="standard", attention="standard")]
    plan = make_plan(two, ScalingConfig(num_workers=[1, 2]), cpu_nodes(2))
    assert plan.mode == "sequential"
    assert any("elastic variants run one after the other" in n for n in plan.notes)


def test_a_min_that_does_not_fit_the_nodes_is_infeasible():
    with pytest.raises(UsageError, match=r"min 3 of 3-4 worker\(s\) x \(1 CPU\) do not fit"):
        make_plan([FLASH], ScalingConfig(num_workers=[3, 4]), cpu_nodes(2))


def test_the_memory_estimate_is_the_min_s_where_fsdp_shards_are_largest():
    """Llama 3 8B on 80 GB GPUs: fsdp over 2 workers needs more per worker than over 4; the
    elastic [2, 4] plan must hold 2, so it is checked, and chooses, as 2 workers would."""
    nodes = [NodeCapacity(node_id="a", cpus=16, gpus=4, gpu_memory_bytes=H100, memory_bytes=256 * 2**30)]
    work = {"flash": Workload(LLAMA3_8B.args(vocab_size=128256, max_seq_len=4096, activation_checkpointing=True),
                              SEQ4096)}

    def per_worker(num_workers):
        v = make_plan([FLASH], ScalingConfig(num_workers=num_workers, use_gpu=True, strategy="fsdp"), nodes,
                      work).variants[0]
        return v.memory["per_worker"]["total"]

    assert per_worker([2, 4]) == per_worker(2) > per_worker(4)


def test_the_data_order_continues_exactly_across_every_resize():
    """2 workers to step 6 (a checkpoint), then 1 worker to step 9, then 3 workers to step 12,
    each resuming from the last checkpoint's samples_consumed as the loop does: together they
    take every window of the shuffled order once, in order, none twice and none skipped."""
    def sampler(world):
        return BatchSampler(seed=7, n_windows=50, micro_batch=2, grad_accum=2, world_size=world)

    taken, consumed, step = [], 0, 0
    for world, until in ((2, 6), (1, 9), (3, 12)):
        s = sampler(world)
        s.continue_from(step, consumed)
        for st in range(step, until):
            for micro in range(s.grad_accum):
                for rank in range(world):
                    taken += list(s.indices(st, micro, rank))
        step, consumed = until, s.consumed(until)
    assert consumed == len(taken) == 2 * 2 * (2 * 6 + 1 * 3 + 3 * 3)
    reference = sampler(1)  # the same order, as one worker would take it
    expected = [w for st in range(consumed // 4) for micro in range(2) for w in reference.indices(st, micro, 0)]
    assert taken == expected
    first_epoch = taken[:50]
    assert sorted(first_epoch) == list(range(50))  # every window once per epoch


def test_a_failed_group_is_recorded_by_rank_with_why_on_one_line(tmp_path):
    """What Ray Train's controller hands the callback when a node dies and when a worker freezes."""
    import json

    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    from orchestrator.failure_log import FailureLog

    died = RuntimeError("ActorDiedError: The actor died unexpectedly before finishing this task.\n\tpid: 7\n"
                        "The actor died because its node has died. Node Id: 5bf7")
    FailureLog(str(tmp_path)).after_exception(None, {
        1: WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: Worker(rank=1)", failure=died),
        0: WorkerHealthCheckTimeoutError("A worker health check has been hanging for 30.02 seconds. Marking the "
                                         "worker as dead.\nWorker info: Worker(rank=0)")})
    line = json.loads((tmp_path / "attempts.jsonl").read_text())
    assert line["failed_ranks"] == {
        "0": "A worker health check has been hanging for 30.02 seconds. Marking the worker as dead.",
        "1": "A worker health check failed. The actor died because its node has died. Node Id: 5bf7"}
