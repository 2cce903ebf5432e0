# What a worker's first CUDA work costs, in a fresh process (issue 14's "attention" phase).
import time
t0 = time.time()
import torch
t1 = time.time()
dev = torch.device("cuda", 0)
torch.cuda.init(); torch.empty(1, device=dev); torch.cuda.synchronize()
t2 = time.time()
from trainer import attention
fn = attention.checked_fn("sdpa_cudnn", device=dev, dtype=torch.bfloat16, head_dim=128, n_heads=16, n_kv_heads=16)
torch.cuda.synchronize()
t3 = time.time()
fn = attention.checked_fn("sdpa_cudnn", device=dev, dtype=torch.bfloat16, head_dim=128, n_heads=16, n_kv_heads=16)
torch.cuda.synchronize()
t4 = time.time()
from orchestrator import config as config_mod
from trainer import parallelize
cfg = config_mod.load("configs/llama-0.95b.yaml")
margs = cfg.model.args(vocab_size=32000, max_seq_len=4096)
raw = parallelize.build_replica(margs, fn, device=dev, seed=0, compile=False)
torch.cuda.synchronize()
t5 = time.time()
print({"import_torch": round(t1 - t0, 2), "cuda_context": round(t2 - t1, 2), "check_sdpa_cudnn_first": round(t3 - t2, 2),
       "check_again": round(t4 - t3, 2), "model_0.95b_on_gpu": round(t5 - t4, 2)})
