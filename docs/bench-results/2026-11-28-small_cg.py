"""Small config (configs/llama-small-gpu.yaml): one kernel, one mode, timed steps. Prints one JSON line.
usage: python3 docs/bench-results/2026-11-28-small_cg.py KERNEL MODE(default|cudagraphs) [iters]"""
import json, sys, time, statistics, yaml, numpy as np, torch
from trainer import attention, parallelize
from trainer.config import ModelConfig, TrainConfig
from trainer.optim import build_optimizer
from trainer.step import Stepper
kernel, mode = sys.argv[1], sys.argv[2]
iters = int(sys.argv[3]) if len(sys.argv) > 3 else 100
if mode == "cudagraphs":
    import torch._inductor.config as ic
    ic.triton.cudagraphs = True
cfg = yaml.safe_load(open("configs/llama-small-gpu.yaml"))
tc = TrainConfig(**cfg["train"])
dev = torch.device("cuda", 0)
m = ModelConfig(**cfg["model"]).args(vocab_size=cfg["model"]["vocab_size"], max_seq_len=tc.seq_len,
                                     activation_checkpointing=tc.activation_checkpointing, loss_impl=tc.loss_impl)
fn = attention.checked_fn(kernel, device=dev, dtype=torch.bfloat16, head_dim=m.head_dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads)
raw = parallelize.build_replica(m, fn, device=dev, seed=0, compile=True)
opt = build_optimizer(raw, tc, dev)
st = Stepper(raw, opt, device=dev, dtype=torch.bfloat16, grad_accum=1, grad_clip=tc.grad_clip, compiled=False)
rng = np.random.default_rng(0)
shape = (tc.micro_batch_size, tc.seq_len)
batches = [[(rng.integers(0, m.vocab_size, shape), rng.integers(0, m.vocab_size, shape))] for _ in range(8)]
times, losses, err = [], [], None
try:
    for i in range(30 + iters):
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        torch.cuda.synchronize(); t = time.perf_counter()
        loss, _ = st(batches[i % 8], tc.lr)
        torch.cuda.synchronize(); times.append(time.perf_counter() - t)
        if i % 10 == 0: losses.append(round(float(loss), 4))
except Exception as e:
    err = f"{type(e).__name__}: {str(e)[:300]}"
from torch._dynamo.utils import counters
w = times[30:]
print(json.dumps({"kernel": kernel, "mode": mode, "error": err,
                  "step_ms_median": round(1000 * statistics.median(w), 3) if w else None,
                  "step_ms_p10": round(1000 * sorted(w)[len(w) // 10], 3) if w else None,
                  "tok_s": round(tc.micro_batch_size * tc.seq_len / statistics.median(w)) if w else None,
                  "losses": losses, "graphs": counters["stats"]["unique_graphs"],
                  "breaks": sum(counters["graph_break"].values()),
                  "cudagraph_skips": dict(counters["inductor"]) .get("cudagraph_skips")}), flush=True)
