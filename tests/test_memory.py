"""The per-worker memory estimate (orchestrator/memory.py): hand-computed cases on a tiny model, the
parameter count against the real model, and the estimate against a measured CPU peak."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from orchestrator.memory import FUSED_CHUNK_BYTES, RUNTIME_BYTES, estimate, param_counts
from trainer.config import ModelConfig, TrainConfig
from trainer.model import Transformer

# dim 8, one block, 2 query heads of dim 4, 1 kv head, FFN 16, vocab 10, tied head.
TINY = ModelConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=16).args(vocab_size=10, max_seq_len=4)
TRAIN = TrainConfig(seq_len=4, micro_batch_size=2, compile=False)  # 8 tokens per micro-batch
CPU = RUNTIME_BYTES["cpu"]


def test_parameter_count_matches_the_model_built_from_the_same_args():
    for args in (TINY, ModelConfig(tie_embeddings=False).args(vocab_size=300, max_seq_len=16)):
        model = Transformer(args, lambda q, k, v: q)
        assert param_counts(args)[0] == sum(p.numel() for p in model.parameters())
    # by hand: block = wq 64 + wk,wv 2*32 + wo 64 + MLP 3*128 + norms 16 = 592; root = embedding 80 + norm 8
    assert param_counts(TINY) == (680, 592, 88)


def test_ddp_on_two_cpu_workers_holds_the_full_replica_and_its_buckets():
    e = estimate(TINY, TRAIN, strategy="ddp", world_size=2, attention="flash", device="cpu")
    assert (e.dtype, e.params, e.grads, e.optimizer, e.gathered) == ("fp32", 2720, 2720, 5440, 0)
    # per token, fp32: residual in 64 + norms 128 + rotary 48 + q,k,v 96 + attention out 64 + MLP 256 = 656
    assert e.activations == 656 * 8 * 2  # one block saved + one block's backward workspace
    assert e.logits == 8 * (128 + 10 * 16)
    assert e.total == 2720 + 5440 + 2720 + (10496 + 2304) + CPU  # gradients live in DDP's buckets


def test_fsdp_shards_model_state_by_world_size_and_adds_the_gathered_units():
    e = estimate(TINY, TRAIN, strategy="fsdp", world_size=2, attention="flash", device="cpu")
    assert (e.params, e.grads, e.optimizer) == (1360, 1360, 2720)
    assert e.gathered == (88 + 2 * 592) * 4  # the root's and two blocks' parameters, unsharded (fp32 on CPU)
    assert e.reduce == 88 * 4  # the root's unsharded gradients (no separate fp32 copy in fp32)
    # gradients trade places with activations in backward: the larger end counts
    assert e.total == 1360 + 2720 + max(e.gathered + 10496 + 2304, 1360 + max(e.reduce, 1024 // 2)) + CPU


# Peaks measured on two H200s (torch.cuda.max_memory_allocated of rank 0, GiB; docs/benchmarks-log/2026-11.md,
# 2026-11-28): the Llama-3-8B shape under fsdp x2 at seq 4096, and the ~0.95B config.
LLAMA3_8B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336, vocab_size=128256,
                        rope_theta=500000, tie_embeddings=False).args(vocab_size=128256, max_seq_len=4096)
LLAMA_095B = ModelConfig(dim=2048, n_layers=16, n_heads=16, ffn_hidden=5632, tie_embeddings=False).args(
    vocab_size=32000, max_seq_len=4096)
FSDP_PEAKS = [(LLAMA3_8B, 1, True, 65.8), (LLAMA3_8B, 2, True, 66.7), (LLAMA3_8B, 1, 2, 65.8),
              (LLAMA_095B, 4, False, 30.1)]


@pytest.mark.parametrize("model,micro_batch,ac,measured", FSDP_PEAKS)
def test_fsdp_estimate_is_within_5_percent_of_the_peaks_measured_on_two_gpus(model, micro_batch, ac, measured):
    tc = TrainConfig(seq_len=4096, micro_batch_size=micro_batch, activation_checkpointing=ac)
    e = estimate(model, tc, strategy="fsdp", world_size=2, attention="flash", device="cuda")
    assert 0.95 <= (e.total - e.runtime) / 2**30 / measured <= 1.05, e.describe()


def test_standard_attention_adds_the_score_matrix_and_flash_does_not():
    flash = estimate(TINY, TRAIN, strategy="ddp", world_size=1, attention="flash", device="cpu")
    std = estimate(TINY, TRAIN, strategy="ddp", world_size=1, attention="standard", device="cpu")
    assert std.activations - flash.activations == 2 * (2 * 4 * 4) * 8  # 2 heads x T=4 fp32 per token, 2 blocks' worth
    long = TRAIN.model_copy(update={"seq_len": 4096, "micro_batch_size": 1})
    big = ModelConfig(dim=512, n_layers=8, n_heads=8).args(vocab_size=1000, max_seq_len=4096)
    f = estimate(big, long, strategy="ddp", world_size=1, attention="flash", device="cpu").activations
    s = estimate(big, long, strategy="ddp", world_size=1, attention="standard", device="cpu").activations
    assert s > 3 * f  # T x T dominates at long sequences


def test_activation_checkpointing_keeps_block_inputs_and_one_recomputed_block():
    ckpt = estimate(TINY, TRAIN.model_copy(update={"activation_checkpointing": True}), strategy="ddp",
                    world_size=1, attention="flash", device="cpu")
    assert ckpt.activations == 1 * 4 * 8 * 8 + 2 * 5248


def test_every_nth_block_checkpointing_lies_between_none_and_every_block():
    four = ModelConfig(dim=8, n_layers=4, n_heads=2, n_kv_heads=1, ffn_hidden=16).args(vocab_size=10, max_seq_len=4)
    acts = {ac: estimate(four, TrainConfig(seq_len=4, micro_batch_size=2, compile=False, activation_checkpointing=ac),
                         strategy="ddp", world_size=1, attention="flash", device="cpu").activations
            for ac in (False, True, 2, 3, 4)}
    block, block_input = 656 * 8, 4 * 8 * 8  # a block's saved tensors (as above); its fp32 input
    assert acts[False] == 4 * block + block  # every block's saved tensors + backward workspace
    assert acts[True] == 4 * block_input + block + block  # + the last block, recomputed first in backward
    # N=2: blocks 0 and 2 keep their inputs, 1 and 3 all they save. Backward recomputes block 2
    # after block 3's tensors are freed, so no block is counted twice.
    assert acts[2] == 2 * block_input + 2 * block + block
    assert acts[True] < acts[2] < acts[4] < acts[False]  # block 0 alone under N=4
    assert acts[4] == 1 * block_input + 3 * block + block
    # N=3: blocks 0 and 3; the last one's recompute comes at once, on top of everything else.
    assert acts[3] == 2 * block_input + 2 * block + block + block


def test_bf16_on_gpu_compiled_halves_what_blocks_keep_and_skips_optimizer_temporaries():
    e = estimate(TINY, TrainConfig(seq_len=4, micro_batch_size=2), strategy="ddp", world_size=1,
                 attention="flash", device="cuda")
    assert e.dtype == "bf16" and e.step_temp == 0 and e.runtime == RUNTIME_BYTES["cuda"]
    # compiled: residual in 64 + normed bf16 32 + q,k,v 48 + attention out 16 + w1, w3 out 64 = 224 per token
    assert e.activations == 224 * 8 * 2
    assert e.logits == 8 * (128 + 10 * (2 + 12))


@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_a_fused_loss_keeps_no_logits_only_its_forward_gradients_and_a_chunk(impl):
    e = estimate(TINY, TrainConfig(seq_len=4, micro_batch_size=2, loss_impl=impl), strategy="ddp", world_size=1,
                 attention="flash", device="cuda")
    # final norm 128 per token, the hidden states' gradient bf16 16 per token, the head's fp32 10 x 8 x 4
    assert e.logits == 8 * (128 + 16) + 320 + FUSED_CHUNK_BYTES
    # auto is counted as standard: the worker decides what imports, the larger is safe
    auto = estimate(TINY, TrainConfig(seq_len=4, micro_batch_size=2, loss_impl="auto"), strategy="ddp",
                    world_size=1, attention="flash", device="cuda")
    assert auto.logits == 8 * (128 + 10 * (2 + 12))


def test_llama3_8b_needs_fsdp_on_two_80gb_gpus_and_fits_there_at_micro_batch_2():
    usable = 0.9 * 81559 * 2**20  # an H100 80GB as NVML reports it, at the default headroom
    for micro_batch in (1, 2):  # configs/llama3-8b.yaml trains at 2
        tc = TrainConfig(seq_len=4096, micro_batch_size=micro_batch, activation_checkpointing=True)
        ddp = estimate(LLAMA3_8B, tc, strategy="ddp", world_size=2, attention="flash", device="cuda")
        fsdp = estimate(LLAMA3_8B, tc, strategy="fsdp", world_size=2, attention="flash", device="cuda")
        assert 15.5 * 8.03e9 < ddp.model_state < 16.5 * 8.03e9  # ~16 bytes per parameter
        assert ddp.total > usable > fsdp.total


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy 'zero'"):
        estimate(TINY, TRAIN, strategy="zero", world_size=1, attention="flash", device="cpu")


MEASURE = """
import json, resource, sys
import psutil, torch
from orchestrator import preprocess
from orchestrator.memory import estimate
from trainer import attention
from trainer.config import ModelConfig, TrainConfig
from trainer.dataset import BatchSampler, get_batch, load_dataset, num_windows
from trainer.model import Transformer
from trainer.optim import build_optimizer
from trainer.step import Stepper

attn = sys.argv[1]
torch.set_num_threads(1)
ds = load_dataset(preprocess.embedded_dataset())
tc = TrainConfig(seq_len=256, micro_batch_size=16)
margs = ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4).args(vocab_size=ds.vocab_size, max_seq_len=256)
cpu = torch.device("cpu")
fn = attention.choose(attn, attention.AttentionShape.of_run(tc, margs), cpu, reuse_verdict=False,
                      time_kernels=False).fn
base = psutil.Process().memory_info().rss  # interpreter, torch, the dataset: the runtime's share
model = Transformer(margs, fn)
opt = build_optimizer(model, tc, cpu)
step = Stepper(model, opt, device=cpu, dtype=torch.float32, grad_accum=1, grad_clip=1.0)
sampler = BatchSampler(seed=0, n_windows=num_windows(len(ds.tokens), 256), micro_batch=16, grad_accum=1, world_size=1)
for s in range(3):
    step([get_batch(ds.tokens, sampler.indices(s, 0, 0), 256)], 1e-3)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
e = estimate(margs, tc, strategy="ddp", world_size=1, attention=attn, device="cpu")
print(json.dumps({"measured": peak - base, "estimated": e.total - e.runtime}))
"""


@pytest.mark.ray  # a subprocess training a model of ~0.5 GB of activations
@pytest.mark.parametrize("attn", ["flash", "standard"])
def test_estimate_is_within_15_percent_of_a_measured_cpu_peak(attn):
    out = subprocess.run([sys.executable, "-c", MEASURE, attn], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["measured"] > 300 * 2**20  # the model's tensors dominate what is measured
    assert 0.85 <= r["estimated"] / r["measured"] <= 1.15, r
