"""train.micro_batch_size auto: the plan takes the largest micro-batch whose estimated peak
fits the worker's memory (orchestrator/micro_batch.py via make_plan), on canned clusters with
measured device sizes; a user's number is kept. Pure: no Ray."""

import json

import pytest

from orchestrator import memory
from orchestrator.config import ModelConfig, ScalingConfig, TrainConfig, VariantConfig
from orchestrator.errors import InfeasibleRequest, UsageError
from orchestrator.micro_batch import MAX_TOKENS
from orchestrator.plan import NodeCapacity, make_plan
from orchestrator.strategy import Workload
from trainer.worker_spec import WorkerSpec

GiB = 2**30
H100 = 81559 * 2**20  # an H100 80GB as NVML reports it
FLASH = VariantConfig(name="flash", attention="flash")
# The ~0.95B config of the GPU benchmarks (configs/llama-0.95b.yaml)
LLAMA_095B = ModelConfig(dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_hidden=5632, vocab_size=32000,
                         tie_embeddings=False)
LLAMA3_8B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256,
                        tie_embeddings=False)
GPU_RUN = dict(seq_len=4096, dtype="bf16", compile=True)


def plan_one(model, train, node, **scaling):
    sc = ScalingConfig(**{"num_workers": 1, **scaling})
    work = Workload(model.args(vocab_size=32000, max_seq_len=train.seq_len,
                               activation_checkpointing=train.activation_checkpointing), train)
    return make_plan([FLASH], sc, [node], {FLASH.name: work})


def gpu(memory_bytes=H100):
    return NodeCapacity(node_id="a", cpus=16, gpus=1, gpu_memory_bytes=memory_bytes, memory_bytes=256 * GiB)


def peak(model, train, size):
    tc = train.model_copy(update={"micro_batch_size": size})
    return memory.estimate(model.args(vocab_size=32000, max_seq_len=tc.seq_len), tc, strategy="ddp", world_size=1,
                           attention="flash").total


def test_auto_takes_the_largest_micro_batch_that_fits_the_gpu_and_the_plan_says_why():
    train = TrainConfig(micro_batch_size="auto", **GPU_RUN)
    v = plan_one(LLAMA_095B, train, gpu(), use_gpu=True).variants[0]
    limit = int(0.9 * H100)
    assert v.micro_batch_size == 10
    assert peak(LLAMA_095B, train, 10) <= limit < peak(LLAMA_095B, train, 11)
    assert v.micro_batch_reason == (f"auto: largest that fits {memory.gib(limit)} (0.9 x {memory.gib(H100)} GPU on "
                                    f"node a): {memory.gib(peak(LLAMA_095B, train, 10))} estimated under ddp")
    # the checked estimate is the resolved micro-batch's
    assert v.memory["per_worker"]["total"] == peak(LLAMA_095B, train, 10)


def test_with_the_fused_liger_loss_auto_reaches_the_measured_best_of_12_capped_in_tokens():
    # liger frees the logits; 12 x 4096 tokens ran fastest on an H200 (docs/BENCHMARKS.md), 16 slower
    train = TrainConfig(micro_batch_size="auto", loss_impl="liger", **GPU_RUN)
    plan = plan_one(LLAMA_095B, train, gpu(), use_gpu=True)
    v = plan.variants[0]
    assert v.micro_batch_size == 12 == MAX_TOKENS // 4096
    assert peak(LLAMA_095B, train, 13) < 0.9 * H100  # it would fit: the cap stopped it
    assert v.micro_batch_reason.endswith(f"under ddp, at most {MAX_TOKENS} tokens per micro-step")
    line = f"    train.micro_batch_size: 12 ({v.micro_batch_reason})"
    assert line in plan.describe()
    saved = json.loads(json.dumps(plan.to_json()))["variants"][0]
    assert (saved["micro_batch_size"], saved["micro_batch_reason"]) == (12, v.micro_batch_reason)


def test_the_workers_get_the_resolved_micro_batch_and_its_reason_with_grad_accum_as_given():
    train = TrainConfig(micro_batch_size="auto", grad_accum_steps=3, loss_impl="liger", **GPU_RUN)
    v = plan_one(LLAMA_095B, train, gpu(), use_gpu=True).variants[0]
    ran, auto = v.resolved(train)
    assert (ran.micro_batch_size, ran.grad_accum_steps, ran.tokens_per_step) == (12, 3, 12 * 3 * 4096)
    assert auto == {"train.micro_batch_size": f"12 ({v.micro_batch_reason})"}
    spec = WorkerSpec(variant="flash", model=LLAMA_095B, train=ran, data_path="d", out_dir="o", auto=auto)
    assert WorkerSpec.model_validate(json.loads(spec.model_dump_json())).train.micro_batch_size == 12


def test_a_micro_batch_the_user_gave_is_kept_and_nothing_is_resolved():
    train = TrainConfig(micro_batch_size=4, **GPU_RUN)
    plan = plan_one(LLAMA_095B, train, gpu(), use_gpu=True)
    v = plan.variants[0]
    assert (v.micro_batch_size, v.micro_batch_reason) == (None, None)
    assert v.resolved(train) == (train, {})
    assert v.memory["per_worker"]["total"] == peak(LLAMA_095B, train, 4)
    assert not any("micro_batch_size" in line for line in plan.describe())


def test_auto_where_not_even_one_sequence_fits_is_refused_in_one_line_naming_the_key_and_numbers():
    train = TrainConfig(micro_batch_size="auto", **GPU_RUN)
    with pytest.raises(InfeasibleRequest) as e:
        plan_one(LLAMA3_8B, train, gpu(), use_gpu=True)
    msg = str(e.value)
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2
    assert msg.startswith("variant flash: train.micro_batch_size auto: not even micro-batch 1 fits: ")
    assert "GiB per worker under ddp x1" in msg and f"{memory.gib(int(0.9 * H100))} (0.9 x" in msg
    assert "\n" not in msg


def test_on_cpu_workers_share_their_nodes_ram_and_a_small_node_limits_the_micro_batch():
    train = TrainConfig(seq_len=128, micro_batch_size="auto", dtype="fp32", compile=False)
    model = ModelConfig(dim=512, n_layers=4, n_heads=8, n_kv_heads=8)
    node = NodeCapacity(node_id="a", cpus=4, gpus=0, memory_bytes=4 * GiB)
    v = plan_one(model, train, node, num_workers=2, use_gpu=False).variants[0]
    limit = int(0.9 * 4 * GiB / 2)
    sizes = [s for s in range(1, MAX_TOKENS // 128 + 1)
             if memory.estimate(model.args(vocab_size=32000, max_seq_len=128),
                                train.model_copy(update={"micro_batch_size": s}), strategy="ddp", world_size=2,
                                attention="flash", device="cpu").total <= limit]
    assert 1 < v.micro_batch_size == max(sizes) < MAX_TOKENS // 128
    assert "RAM shared by 2 worker(s) on node a" in v.micro_batch_reason


def test_auto_without_a_measured_device_memory_takes_8_and_says_so():
    node = NodeCapacity(node_id="a", cpus=16, gpus=1)
    v = plan_one(LLAMA_095B, TrainConfig(micro_batch_size="auto", **GPU_RUN), node, use_gpu=True).variants[0]
    assert (v.micro_batch_size, v.micro_batch_reason) == (8, "auto: device memory unknown, so 8")


def test_a_worker_never_trains_an_unresolved_auto_micro_batch():
    with pytest.raises(ValueError, match="train.micro_batch_size auto reaches a worker unresolved"):
        WorkerSpec(variant="flash", model=ModelConfig(), train=TrainConfig(micro_batch_size="auto"),
                   data_path="d", out_dir="o")
