import time, sys, os
t0 = time.perf_counter()
import numpy as np, torch
from trainer.config import ModelConfig, TrainConfig
from trainer.model import Transformer
from trainer.optim import build_optimizer
from trainer.step import Stepper
torch.manual_seed(0)
margs = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2).args(vocab_size=256, max_seq_len=32, activation_checkpointing=False)
from trainer import attention
model = Transformer(margs, attention.standard_attention)
tc = TrainConfig(seq_len=32, micro_batch_size=2, max_steps=2)
opt = build_optimizer(model, tc, torch.device("cpu"))
st = Stepper(model, opt, device=torch.device("cpu"), dtype=torch.float32, grad_accum=1, grad_clip=1.0, compile=True)
x = np.random.randint(0, 256, (2, 32)).astype(np.int64)
t1 = time.perf_counter()
loss, _ = st([(x, x)], 1e-3); loss.item()
t2 = time.perf_counter()
print(f"first compiled step {t2-t1:.1f} s; artifacts {st.compile_artifacts} exists={st.compile_artifacts.exists()}")
