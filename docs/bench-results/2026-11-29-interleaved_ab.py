"""Small config, in ONE process: several kernels' models under block CUDA graphs (or the whole
model compiled), timed interleaved (A B C A B C ...), `steps` steps per slot, one sync per slot.
usage: python3 docs/bench-results/2026-11-29-interleaved_ab.py SCOPE(block|whole) ROUNDS STEPS kernel...  -> JSON lines"""
import json, sys, time, statistics, yaml, numpy as np, torch
from trainer import attention, parallelize, compile_mode
from trainer.config import ModelConfig, TrainConfig
from trainer.optim import build_optimizer
from trainer.step import Stepper
scope, rounds, steps, kernels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
compile_mode.set_mode("reduce-overhead")
cfg = yaml.safe_load(open("configs/llama-small-gpu.yaml"))
tc = TrainConfig(**cfg["train"])
dev = torch.device("cuda", 0)
m = ModelConfig(**cfg["model"]).args(vocab_size=cfg["model"]["vocab_size"], max_seq_len=tc.seq_len,
                                     activation_checkpointing=tc.activation_checkpointing, loss_impl=tc.loss_impl)
rng = np.random.default_rng(0)
shape = (tc.micro_batch_size, tc.seq_len)
batches = [[(rng.integers(0, m.vocab_size, shape), rng.integers(0, m.vocab_size, shape))] for _ in range(8)]
runs = {}
for k in kernels:
    fn = attention.standard_attention if k == "standard" else attention.checked_fn(
        k, device=dev, dtype=torch.bfloat16, head_dim=m.head_dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads)
    raw = parallelize.build_replica(m, fn, device=dev, seed=0, compile=(scope == "block"))
    if scope == "whole":
        torch._dynamo.config.optimize_ddp = False
        raw = torch.compile(raw, dynamic=False)
    st = Stepper(raw, build_optimizer(raw, tc, dev), device=dev, dtype=torch.bfloat16, grad_accum=1,
                 grad_clip=tc.grad_clip, compiled=False, cudagraphs=True)
    for i in range(20):
        loss, _ = st(batches[i % 8], tc.lr)
    torch.cuda.synchronize()
    runs[k] = {"st": st, "slots": [], "loss0": float(loss)}
t_all = time.perf_counter()
for r in range(rounds):
    for k in kernels:
        st = runs[k]["st"]
        torch.cuda.synchronize(); t = time.perf_counter()
        for i in range(steps):
            loss, _ = st(batches[i % 8], tc.lr)
        torch.cuda.synchronize()
        runs[k]["slots"].append(1000 * (time.perf_counter() - t) / steps)
# GPU busy per step, one kernel at a time (profiler: the sum of device kernel time)
from torch.profiler import profile, ProfilerActivity
for k in kernels:
    st = runs[k]["st"]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(10):
            st(batches[i % 8], tc.lr)
        torch.cuda.synchronize()
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / 10
    runs[k]["gpu_busy_ms"] = round(busy, 3)
for k in kernels:
    s = runs[k]["slots"]
    print(json.dumps({"scope": scope, "kernel": k, "ms_median": round(statistics.median(s), 3),
                      "ms_min": round(min(s), 3), "ms_max": round(max(s), 3), "slots": [round(x, 3) for x in s],
                      "tok_s_median": round(8192 / statistics.median(s) * 1000), "gpu_busy_ms": runs[k]["gpu_busy_ms"],
                      "loss0": round(runs[k]["loss0"], 4)}), flush=True)
