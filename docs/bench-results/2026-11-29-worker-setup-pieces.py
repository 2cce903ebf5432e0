# p1: what a worker's setup and first step cost, piece by piece, in a fresh process (issue 14).
import glob, json, os, sys, time, ctypes
mode = sys.argv[1]
T = {}
def lap(k, t0):
    T[k] = round(time.time() - t0, 3)
t = time.time(); import torch; lap("import_torch", t)
t = time.time(); import trainer.loop; lap("import_trainer_loop", t)
from trainer import attention, parallelize, compile_cache, model_args
from trainer.step import Stepper
from trainer.optim import build_optimizer
dev = torch.device("cuda", 0)
t = time.time(); torch.cuda.init(); torch.empty(1, device=dev); torch.cuda.synchronize(); lap("cuda_ctx", t)
if mode == "dlopen":
    import nvidia.cudnn
    d = os.path.join(list(nvidia.cudnn.__path__)[0], "lib")
    t = time.time()
    for f in sorted(glob.glob(d + "/libcudnn*.so*")):
        t1 = time.time(); ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL); T["dlopen_" + os.path.basename(f)] = round(time.time() - t1, 3)
    lap("dlopen_all", t)
t = time.time(); a = torch.randn(64, 64, device=dev); (a @ a).sum().item(); lap("cublas_fp32_first", t)
t = time.time(); b = a.bfloat16(); (b @ b).sum().item(); lap("cublas_bf16_first", t)
from torch.nn.functional import scaled_dot_product_attention as sdpa
from torch.nn.attention import sdpa_kernel, SDPBackend
def run(tag, B, H, S, D):
    q, k, v = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        t = time.time(); o = sdpa(q, k, v, is_causal=True); torch.cuda.synchronize(); lap(tag + "_fwd", t)
        t = time.time(); o.backward(torch.ones_like(o)); torch.cuda.synchronize(); lap(tag + "_bwd", t)
if mode == "trainfirst":
    run("train_shape_1", 4, 16, 4096, 128)
t = time.time(); fn = attention.checked_fn("sdpa_cudnn", device=dev, dtype=torch.bfloat16, head_dim=128, n_heads=16, n_kv_heads=16); torch.cuda.synchronize(); lap("check_first", t)
t = time.time(); attention.checked_fn("sdpa_cudnn", device=dev, dtype=torch.bfloat16, head_dim=128, n_heads=16, n_kv_heads=16); torch.cuda.synchronize(); lap("check_again", t)
run("train_shape_a", 4, 16, 4096, 128)
run("train_shape_b", 4, 16, 4096, 128)
run("seq2048_first", 4, 16, 2048, 128)
from orchestrator import config as config_mod
cfg = config_mod.load("configs/llama-0.95b.yaml")
margs = cfg.model.args(vocab_size=32000, max_seq_len=4096)
t = time.time(); import torch.distributed.tensor; lap("import_dtensor", t)
t = time.time(); raw = parallelize._on_meta(margs, fn, device=dev, float8=None); lap("build_meta", t)
t = time.time(); raw.to_empty(device=dev); raw.tie_weights(); torch.cuda.synchronize(); lap("build_to_empty", t)
t = time.time(); parallelize.init_replayed(raw, dev, 0); torch.cuda.synchronize(); lap("build_init", t)
t = time.time(); parallelize.compile_blocks(raw); lap("compile_blocks_call", t)
tc = cfg.train
t = time.time(); opt = build_optimizer(raw, tc, dev); lap("optimizer", t)
stepper = Stepper(raw, opt, device=dev, dtype=torch.bfloat16, grad_accum=1, grad_clip=1.0, compiled=True)
import numpy as np
x = np.random.randint(0, 32000, size=(4, 4097)).astype(np.int64)
batch = [(x[:, :-1], x[:, 1:])]
orig_load, orig_save = compile_cache.load_artifacts, compile_cache.save_artifacts
def timed(name, f):
    def g(*a, **k):
        t = time.time(); r = f(*a, **k); T[name] = round(time.time() - t, 3); T[name + "_ok"] = r; return r
    return g
compile_cache.load_artifacts, compile_cache.save_artifacts = timed("artifacts_load", orig_load), timed("artifacts_save", orig_save)
t = time.time(); l, _ = stepper(batch, 1e-4); l.item(); lap("first_step", t)
t = time.time(); l, _ = stepper(batch, 1e-4); l.item(); lap("second_step", t)
print(mode, json.dumps(T))
