"""The plan's strategy choice and memory check (orchestrator/strategy.py via make_plan), on
canned clusters with measured device sizes. Pure: no Ray."""

import json

import pytest

from orchestrator.config import ModelConfig, ScalingConfig, TrainConfig, VariantConfig, validate
from orchestrator.errors import InfeasibleRequest, UsageError
from orchestrator.plan import NodeCapacity, make_plan
from orchestrator.strategy import Workload

H100 = 81559 * 2**20  # an H100 80GB as NVML reports it
FLASH = VariantConfig(name="flash", attention="flash")
STANDARD = VariantConfig(name="standard", attention="standard")
LLAMA3_8B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256,
                        tie_embeddings=False)
SEQ4096 = TrainConfig(seq_len=4096, micro_batch_size=1, activation_checkpointing=True)


def gpu_node(name="a", gpus=2, gpu_memory=H100):
    return NodeCapacity(node_id=name, cpus=16, gpus=gpus, gpu_memory_bytes=gpu_memory, memory_bytes=256 * 2**30)


def cpu_node(name="a", cpus=4, ram=16 * 2**30):
    return NodeCapacity(node_id=name, cpus=cpus, gpus=0, memory_bytes=ram)


def work(model=None, train=None, vocab=2048):
    model, train = model or ModelConfig(), train or TrainConfig()
    return Workload(model.args(vocab_size=vocab, max_seq_len=train.seq_len,
                               activation_checkpointing=train.activation_checkpointing), train)


def plan_one(model=None, train=None, nodes=None, variant=FLASH, **scaling):
    sc = ScalingConfig(**{"num_workers": 2, **scaling})
    return make_plan([variant], sc, nodes or [cpu_node()], {variant.name: work(model, train)})


def test_auto_picks_ddp_for_a_small_model_and_says_why():
    plan = plan_one()
    v = plan.variants[0]
    assert v.strategy == "ddp" and v.strategy_reason.startswith("auto: ddp, model state")
    assert "strategy ddp" in plan.describe()[1]
    assert json.loads(json.dumps(plan.to_json()))["variants"][0]["strategy"] == "ddp"
    assert v.memory["per_worker"]["total"] <= v.memory["limit_bytes"]


def test_auto_picks_fsdp_when_the_model_state_would_not_fit_comfortably_on_the_gpus():
    plan = plan_one(LLAMA3_8B, SEQ4096, [gpu_node()], use_gpu=True)
    v = plan.variants[0]
    assert v.strategy == "fsdp"
    assert "ddp's" in v.strategy_reason and "exceed" in v.strategy_reason and "GPU on node a" in v.strategy_reason
    assert any(line.strip().startswith("strategy: auto: fsdp") for line in plan.describe())


def test_a_model_that_fits_under_no_strategy_is_refused_with_the_estimates():
    with pytest.raises(InfeasibleRequest) as e:
        plan_one(LLAMA3_8B, SEQ4096, [gpu_node(gpus=1)], num_workers=1, use_gpu=True)
    msg = str(e.value)
    assert "variant flash: does not fit in memory under any strategy" in msg
    assert "ddp needs" in msg and "fsdp needs" in msg and "GiB" in msg and "scaling.memory_headroom" in msg
    assert e.value.exit_code == 2


@pytest.mark.parametrize("model, train", [(ModelConfig(n_layers=100000), None),
                                          (None, TrainConfig(micro_batch_size=1000000))])
def test_absurd_sizes_from_the_bad_input_table_are_refused_by_the_plan(model, train):
    with pytest.raises(InfeasibleRequest, match=r"does not fit in memory under any strategy.*RAM shared by 2"):
        plan_one(model, train, [cpu_node(ram=23 * 2**30)])


def test_explicit_ddp_that_does_not_fit_points_to_fsdp():
    with pytest.raises(InfeasibleRequest, match=r"under scaling.strategy ddp.*scaling.strategy fsdp would fit"):
        plan_one(LLAMA3_8B, SEQ4096, [gpu_node()], use_gpu=True, strategy="ddp")


def test_explicit_fsdp_is_kept_for_a_small_model():
    v = plan_one(strategy="fsdp").variants[0]
    assert v.strategy == "fsdp" and v.memory["per_worker"]["strategy"] == "fsdp"


def test_the_smallest_gpu_of_the_plan_decides():
    big, small = gpu_node("big", gpus=1, gpu_memory=141 * 2**30), gpu_node("small", gpus=1, gpu_memory=24 * 2**30)
    with pytest.raises(InfeasibleRequest, match="on node small"):
        plan_one(LLAMA3_8B, SEQ4096, [big, small], use_gpu=True)


def test_a_higher_headroom_lets_a_tight_plan_through():
    from orchestrator.memory import estimate

    w = work(ModelConfig(dim=512, n_layers=4, n_heads=8), TrainConfig(micro_batch_size=16))
    need = estimate(w.model, w.train, strategy="ddp", world_size=2, attention="flash", device="cpu").total
    nodes = [cpu_node(ram=int(2 * need / 0.95))]  # two workers share it: each gets 1/0.95 of its need at 1.0
    with pytest.raises(InfeasibleRequest):
        plan_one(ModelConfig(dim=512, n_layers=4, n_heads=8), w.train, nodes, memory_headroom=0.5)
    assert plan_one(ModelConfig(dim=512, n_layers=4, n_heads=8), w.train, nodes,
                    memory_headroom=1.0).variants[0].strategy == "ddp"


def test_variants_that_fit_the_cpus_together_but_not_the_ram_run_one_after_the_other():
    both = [FLASH, STANDARD]
    model, train = ModelConfig(dim=512, n_layers=4, n_heads=8), TrainConfig(micro_batch_size=16, seq_len=256)
    wl = {v.name: work(model, train) for v in both}
    one = wl["standard"]
    from orchestrator.memory import estimate
    need = estimate(one.model, one.train, strategy="ddp", world_size=2, attention="standard", device="cpu").total
    ram = int(3 * need / 0.9)  # room for 3 of the 4 workers the concurrent plan would put here
    plan = make_plan(both, ScalingConfig(num_workers=2), [cpu_node(cpus=4, ram=ram)], wl)
    assert plan.mode == "sequential" and "not its memory" in plan.notes[0]
    assert all(v.strategy == "ddp" for v in plan.variants)


def test_without_device_sizes_the_strategy_is_taken_as_asked():
    v = plan_one(nodes=[NodeCapacity(node_id="a", cpus=4, gpus=0)], strategy="fsdp").variants[0]
    assert v.strategy == "fsdp" and "not checked" in v.strategy_reason


def test_an_unknown_strategy_is_a_config_error_naming_the_key():
    with pytest.raises(UsageError, match=r"scaling\.strategy: Input should be 'auto', 'ddp' or 'fsdp' \(got 'zero'\)"):
        validate({"scaling": {"strategy": "zero"}})
    with pytest.raises(UsageError, match=r"scaling\.memory_headroom"):
        validate({"scaling": {"memory_headroom": 1.5}})
