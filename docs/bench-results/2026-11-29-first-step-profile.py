# p2: the warm first compiled step of the ~0.95B model, profiled (cProfile), after the preload's imports.
import cProfile, io, json, pstats, sys, time
T = {}
def lap(k, t0): T[k] = round(time.time() - t0, 3)
t = time.time(); import torch, torch._dynamo, torch._inductor.compile_fx, trainer.loop; lap("preload_imports", t)
t = time.time(); import triton; lap("import_triton", t)
from trainer import attention, parallelize
from trainer.step import Stepper
from trainer.optim import build_optimizer
from orchestrator import config as config_mod
import numpy as np
dev = torch.device("cuda", 0)
t = time.time(); torch.cuda.init(); torch.empty(1, device=dev); torch.cuda.synchronize(); lap("cuda_ctx", t)
t = time.time(); fn = attention.checked_fn("sdpa_cudnn", device=dev, dtype=torch.bfloat16, head_dim=128, n_heads=16, n_kv_heads=16); lap("check", t)
cfg = config_mod.load("configs/llama-0.95b.yaml")
margs = cfg.model.args(vocab_size=32000, max_seq_len=4096)
t = time.time(); raw = parallelize.build_replica(margs, fn, device=dev, seed=0, compile=True); torch.cuda.synchronize(); lap("build", t)
opt = build_optimizer(raw, cfg.train, dev)
stepper = Stepper(raw, opt, device=dev, dtype=torch.bfloat16, grad_accum=1, grad_clip=1.0, compiled=True)
x = np.random.randint(0, 32000, size=(4, 4097)).astype(np.int64)
batch = [(x[:, :-1], x[:, 1:])]
mode = sys.argv[1]
pr = cProfile.Profile()
t = time.time()
if mode == "profile": pr.enable()
l, _ = stepper(batch, 1e-4); l.item()
if mode == "profile": pr.disable()
lap("first_step", t)
t = time.time(); l, _ = stepper(batch, 1e-4); l.item(); lap("second_step", t)
print(mode, json.dumps(T))
if mode == "profile":
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("cumulative").print_stats(45); print(s.getvalue()[-9000:])
    s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("tottime").print_stats(20); print(s.getvalue()[-4000:])
