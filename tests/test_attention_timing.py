"""Flash kernels are chosen by timing: the fastest that passed its check wins, a kernel that
cannot be timed is skipped, and the choice is cached per node and shape."""

import json
from unittest import mock

import pytest
import torch

from trainer import attention, user_cache
from trainer.attention import cache, choice
from trainer.attention import timing as kernel_select
from trainer.attention.shape import AttentionShape as Shape

SHAPE = Shape(seq_len=64, micro_batch=2, n_heads=4, n_kv_heads=2, head_dim=16, dtype="fp32", compile="false")
VERSIONS = {"torch": "2.11.0", "gpu": "NVIDIA H100 80GB HBM3", "driver": "580.1", "flash-attn-4": "4.0.0b36"}


def picker(shape, device, *, timer, directory, versions, **how):
    """The choice among the kernels that passed, cached under this node's key (its facts: ``versions``)."""
    def pick(passed):
        with mock.patch.object(cache, "node_facts", lambda env: dict(versions)):
            path = cache.path_for(shape, False, {cache.CACHE_DIR_ENV: str(directory)})
        return choice.fastest_here(passed, shape, device, path, timer=timer, **how)

    return pick


def _fake_kernels(*names):
    return {n: attention.standard_attention for n in names}


class Timer:
    """Injected timings; counts calls so a cache hit is visible."""

    def __init__(self, ms: dict[str, float], fail: dict[str, Exception] | None = None):
        self.ms, self.fail, self.calls = ms, fail or {}, []

    def __call__(self, name, fn):
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]
        return self.ms[name]


def test_the_fastest_candidate_wins_not_the_first_in_order():
    sel = kernel_select.fastest(_fake_kernels("flash_attn_4", "sdpa_cudnn", "sdpa_flash"),
                                Timer({"flash_attn_4": 9.5, "sdpa_cudnn": 4.1, "sdpa_flash": 6.0}))
    assert sel.kernel == "sdpa_cudnn"
    assert sel.timings == {"flash_attn_4": 9.5, "sdpa_cudnn": 4.1, "sdpa_flash": 6.0}
    assert kernel_select.describe(sel.kernel, sel.timings) == "kernel sdpa_cudnn (4.1 ms/iter), runner-up sdpa_flash (6 ms)"


def test_a_candidate_that_fails_at_the_real_shape_is_skipped_with_its_reason():
    sel = kernel_select.fastest(_fake_kernels("flash_attn_4", "sdpa_cudnn"),
                                Timer({"sdpa_cudnn": 4.1}, fail={"flash_attn_4": torch.OutOfMemoryError("CUDA out of memory")}))
    assert sel.kernel == "sdpa_cudnn" and "flash_attn_4" not in sel.timings
    assert sel.failed["flash_attn_4"].startswith("OutOfMemoryError: CUDA out of memory")


def test_cache_miss_times_and_stores_then_a_hit_does_not_time_again(tmp_path):
    candidates = _fake_kernels("flash_attn_4", "sdpa_cudnn")
    timer = Timer({"flash_attn_4": 3.0, "sdpa_cudnn": 4.0})
    pick = picker(SHAPE, torch.device("cpu"), timer=timer, directory=tmp_path, versions=VERSIONS)
    assert pick(candidates) == ("flash_attn_4", {"flash_attn_4": 3.0, "sdpa_cudnn": 4.0})
    assert timer.calls == ["flash_attn_4", "sdpa_cudnn"]
    [cached] = tmp_path.rglob("*.json")
    assert json.loads(cached.read_text())["choice"]["kernel"] == "flash_attn_4"

    again = Timer({"flash_attn_4": 99.0, "sdpa_cudnn": 1.0})
    pick = picker(SHAPE, torch.device("cpu"), timer=again, directory=tmp_path, versions=VERSIONS)
    assert pick(candidates) == ("flash_attn_4", {"flash_attn_4": 3.0, "sdpa_cudnn": 4.0})
    assert again.calls == []


@pytest.mark.parametrize("change", [
    {"shape": {"seq_len": 4096}}, {"shape": {"micro_batch": 4}}, {"shape": {"n_kv_heads": 4}},
    {"shape": {"dtype": "bf16"}}, {"versions": {"torch": "2.12.0"}}, {"versions": {"flash-attn-4": "4.0.0"}},
    {"versions": {"driver": "590.2"}}, {"versions": {"gpu": "NVIDIA H200"}},
])
def test_another_shape_or_version_is_a_cache_miss(tmp_path, change):
    candidates = _fake_kernels("flash_attn_4", "sdpa_cudnn")
    picker(SHAPE, torch.device("cpu"), timer=Timer({"flash_attn_4": 3.0, "sdpa_cudnn": 4.0}),
                         directory=tmp_path, versions=VERSIONS)(candidates)
    shape = Shape(**{**SHAPE.__dict__, **change.get("shape", {})})
    timer = Timer({"flash_attn_4": 5.0, "sdpa_cudnn": 2.0})
    pick = picker(shape, torch.device("cpu"), timer=timer, directory=tmp_path,
                                versions={**VERSIONS, **change.get("versions", {})})
    assert pick(candidates)[0] == "sdpa_cudnn" and timer.calls == ["flash_attn_4", "sdpa_cudnn"]


def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog):
    candidates = _fake_kernels("flash_attn_4", "sdpa_cudnn")
    picker(SHAPE, torch.device("cpu"), timer=Timer({"flash_attn_4": 3.0, "sdpa_cudnn": 4.0}),
                         directory=tmp_path, versions=VERSIONS)(candidates)
    [cached] = tmp_path.rglob("*.json")
    cached.write_text('{"key": ')
    timer = Timer({"flash_attn_4": 5.0, "sdpa_cudnn": 2.0})
    pick = picker(SHAPE, torch.device("cpu"), timer=timer, directory=tmp_path, versions=VERSIONS)
    assert pick(candidates)[0] == "sdpa_cudnn"
    assert "ignoring the kernel cache file" in caplog.text
    assert json.loads(cached.read_text())["choice"]["kernel"] == "sdpa_cudnn"


def test_a_cached_kernel_that_no_longer_passes_its_check_is_timed_again(tmp_path):
    picker(SHAPE, torch.device("cpu"), timer=Timer({"flash_attn_4": 3.0, "sdpa_cudnn": 4.0}),
                         directory=tmp_path, versions=VERSIONS)(_fake_kernels("flash_attn_4", "sdpa_cudnn"))
    timer = Timer({"sdpa_flash": 5.0, "sdpa_cudnn": 4.0})
    pick = picker(SHAPE, torch.device("cpu"), timer=timer, directory=tmp_path, versions=VERSIONS)
    assert pick(_fake_kernels("sdpa_cudnn", "sdpa_flash"))[0] == "sdpa_cudnn" and len(timer.calls) == 2


def test_the_cache_directory_comes_from_the_environment(tmp_path):
    assert cache.cache_dir({cache.CACHE_DIR_ENV: str(tmp_path)}) == tmp_path
    assert cache.cache_dir({}) == user_cache.root({}) / "preflight"


def test_resolve_times_every_passing_candidate_and_records_the_timings(monkeypatch, tmp_path):
    monkeypatch.setattr(choice, "flash_candidates", lambda device: ["sdpa_flash_cpu", "flash_attn_4", "sdpa_efficient"])
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    timer = Timer({"sdpa_flash_cpu": 2.0})
    r = attention.choose("flash", SHAPE, torch.device("cpu"), timer=timer, reuse_verdict=False,
                         flash_attn_allowed=False)
    # flash_attn_4 is blocked and sdpa_efficient has no CPU kernel: one passes, so nothing is timed.
    assert (r.kernel, r.timings) == ("sdpa_flash_cpu", {}) and timer.calls == []
    assert set(r.rejected) == {"flash_attn_4", "sdpa_efficient"}


def test_the_real_block_timer_times_a_kernel_forward_and_backward_on_cpu():
    timer = kernel_select.block_timer(SHAPE, torch.device("cpu"), warmup=1, iters=2)
    ms = timer("sdpa_flash_cpu", attention.kernel_fn("sdpa_flash_cpu"))
    assert 0 < ms < 10_000


def test_with_an_mlp_width_the_timer_runs_whole_blocks_stacked_as_the_model_stacks_them(monkeypatch):
    """The kernels are timed inside the model's own blocks (norms, attention, MLP), two deep
    where the model has two or more layers; one attention block alone only without a width."""
    from trainer import model

    monkeypatch.setattr(kernel_select, "group_size", lambda seconds: 1)  # 1 warm-up + 3 alone + 1 timed step
    mlp_calls = []
    real_mlp = model.MLP.forward
    monkeypatch.setattr(model.MLP, "forward", lambda self, x: mlp_calls.append(1) or real_mlp(self, x))

    def run(shape):
        calls = []

        def counted(q, k, v):
            calls.append(q.shape)
            return attention.standard_attention(q, k, v)

        kernel_select.block_timer(shape, torch.device("cpu"), warmup=1, iters=1)("counted", counted)
        return calls

    assert kernel_select.timed_blocks(SHAPE) == 1
    assert len(run(SHAPE)) == 5 and mlp_calls == []  # no width: the attention block alone
    whole = Shape(**{**SHAPE.__dict__, "ffn_hidden": 48, "n_layers": 8})
    assert kernel_select.timed_blocks(whole) == kernel_select.MAX_TIMED_BLOCKS == 2
    calls = run(whole)
    assert len(calls) == 2 * 5 and len(mlp_calls) == 2 * 5
    assert calls[0] == (SHAPE.micro_batch, SHAPE.n_heads, SHAPE.seq_len, SHAPE.head_dim)
    one_layer = Shape(**{**whole.__dict__, "n_layers": 1, "activation_checkpointing": 1})
    assert kernel_select.timed_blocks(one_layer) == 1
    # Checkpointed, the block recomputes its forward in backward: the kernel runs twice per step.
    assert len(run(one_layer)) == 2 * 5


def test_the_run_shape_carries_the_mlp_width_and_checkpointing_into_the_timing_and_its_cache_key():
    from trainer.config import TrainConfig
    from trainer.model_args import ModelArgs

    margs = ModelArgs(vocab_size=100, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=176, max_seq_len=64,
                      activation_checkpointing=2)
    tc = TrainConfig(seq_len=64, micro_batch_size=2, dtype="fp32", compile=False)
    shape = Shape.of_run(tc, margs)
    assert (shape.ffn_hidden, shape.activation_checkpointing, shape.n_layers) == (176, 2, 3)
    other = Shape.of_run(tc, ModelArgs(**{**margs.__dict__, "ffn_hidden": 192}))
    assert cache.node_key(shape, False) != cache.node_key(other, False)


def test_past_the_time_budget_the_rest_go_untimed_and_the_partial_choice_is_not_cached(tmp_path):
    import time

    def slow(name, fn):
        time.sleep(0.05)
        return {"flash_attn_4": 3.0, "sdpa_cudnn": 1.0}[name]

    pick = picker(SHAPE, torch.device("cpu"), timer=slow, directory=tmp_path, versions=VERSIONS,
                                budget_s=0.01)
    assert pick(_fake_kernels("flash_attn_4", "sdpa_cudnn")) == ("flash_attn_4", {"flash_attn_4": 3.0})
    assert list(tmp_path.rglob("*.json")) == []


# ---------------------------------------------------------------- standard attention in the field

GPU_BYTES = 80 * 2**30


def test_standard_is_timed_only_where_the_whole_models_scores_fit_a_tenth_of_the_gpu():
    small = Shape(seq_len=1024, micro_batch=8, n_heads=8, n_kv_heads=4, head_dim=64, dtype="bf16", compile="true",
                  n_layers=8)  # configs/llama-small-gpu.yaml: 8 x 8 x 8 x 1024^2 x 6 B = 3 GiB
    big = Shape(seq_len=4096, micro_batch=4, n_heads=16, n_kv_heads=16, head_dim=128, dtype="bf16", compile="true",
                n_layers=16)  # configs/llama-0.95b.yaml, where standard attention runs out of memory: 96 GiB
    assert kernel_select.standard_scores_bytes(small) == 3 * 2**30
    assert kernel_select.times_standard(small, GPU_BYTES)
    assert not kernel_select.times_standard(big, GPU_BYTES)
    assert not kernel_select.times_standard(small, None)  # no GPU: nothing to gain, nothing timed


def test_standard_attention_timed_fastest_is_the_flash_variants_choice(tmp_path):
    timer = Timer({"sdpa_cudnn": 4.0, "sdpa_flash": 4.4, "standard": 3.6})
    pick = picker(SHAPE, torch.device("cpu"), timer=timer, directory=tmp_path, versions=VERSIONS,
                  device_bytes=GPU_BYTES)
    kernel, timings = pick(_fake_kernels("sdpa_cudnn", "sdpa_flash"))
    assert timer.calls == ["sdpa_cudnn", "sdpa_flash", "standard"]  # standard last: the fused kernels come first
    assert (kernel, timings) == ("standard", {"sdpa_cudnn": 4.0, "sdpa_flash": 4.4, "standard": 3.6})
    # The cached choice holds standard too: the next run takes it without timing.
    again = Timer({"sdpa_cudnn": 1.0, "sdpa_flash": 1.0, "standard": 9.0})
    repick = picker(SHAPE, torch.device("cpu"), timer=again, directory=tmp_path, versions=VERSIONS,
                    device_bytes=GPU_BYTES)
    assert repick(_fake_kernels("sdpa_cudnn", "sdpa_flash"))[0] == "standard" and again.calls == []


def test_one_fused_kernel_and_standard_are_still_a_choice_and_resolve_returns_standard_attention(monkeypatch, tmp_path):
    monkeypatch.setattr(choice, "flash_candidates", lambda device: ["sdpa_flash_cpu"])
    monkeypatch.setattr(kernel_select, "device_memory", lambda device: GPU_BYTES)
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    timer = Timer({"sdpa_flash_cpu": 2.0, "standard": 1.0})
    r = attention.choose("flash", SHAPE, torch.device("cpu"), timer=timer, reuse_verdict=False)
    assert r.kernel == "standard" and r.fn is attention.standard_attention
    assert r.timings == {"sdpa_flash_cpu": 2.0, "standard": 1.0} and r.rejected == {}


def test_without_the_gpus_memory_standard_is_not_timed(tmp_path):
    timer = Timer({"sdpa_cudnn": 4.0, "sdpa_flash": 4.4, "standard": 0.1})
    pick = picker(SHAPE, torch.device("cpu"), timer=timer, directory=tmp_path, versions=VERSIONS)
    assert pick(_fake_kernels("sdpa_cudnn", "sdpa_flash"))[0] == "sdpa_cudnn" and "standard" not in timer.calls


def test_small_blocks_are_timed_in_groups_queued_back_to_back_as_training_queues_them():
    assert kernel_select.group_size(0.0018) == 12  # 1.8 ms: 12 iterations make the 20 ms group
    assert kernel_select.group_size(0.05) == 1  # a big block is timed alone
    assert kernel_select.group_size(0.0) == kernel_select.MAX_GROUP


def test_a_choice_timed_by_another_method_is_timed_again(tmp_path, monkeypatch):
    """The key holds the digest of the code that checks and times: new code, new timing."""
    timer = Timer({"flash_attn_4": 3.0, "sdpa_cudnn": 4.0})
    picker(SHAPE, torch.device("cpu"), timer=timer, directory=tmp_path, versions=VERSIONS)(
        _fake_kernels("flash_attn_4", "sdpa_cudnn"))
    again = Timer({"flash_attn_4": 3.0, "sdpa_cudnn": 1.0})
    pick = picker(SHAPE, torch.device("cpu"), timer=again, directory=tmp_path, versions={**VERSIONS, "code": "new"})
    assert pick(_fake_kernels("flash_attn_4", "sdpa_cudnn"))[0] == "sdpa_cudnn" and len(again.calls) == 2
