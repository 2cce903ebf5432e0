"""Grad accumulation 2 under whole-model CUDA graphs: losses and grad norms of block/default,
whole/default (no graphs), whole/graphs, whole/graphs with grads kept allocated (zeroed in place)."""
import json, sys, numpy as np, torch
from trainer import attention, compile_mode
from trainer.config import TrainConfig
from trainer.model import ModelArgs, Transformer
from trainer.optim import build_optimizer
from trainer.parallelize import compile_blocks, compile_whole
from trainer.step import Stepper
ARGS = ModelArgs(vocab_size=2048, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=768, max_seq_len=256)
dev = torch.device("cuda")
def run(scope, mode, keep_grads=False, ga=2, steps=8):
    torch._dynamo.reset()
    fn = attention.checked_fn("sdpa_flash", device=dev, dtype=torch.bfloat16, head_dim=ARGS.head_dim, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    model = Transformer(ARGS, fn).to(dev)
    (compile_whole if scope == "whole" else compile_blocks)(model)
    tc = TrainConfig(lr=1e-3, grad_accum_steps=ga)
    opt = build_optimizer(model, tc, dev)
    st = Stepper(model, opt, device=dev, dtype=torch.bfloat16, grad_accum=ga, grad_clip=1.0,
                 cudagraphs=compile_mode.uses_cudagraphs(mode))
    if keep_grads:
        for p in model.parameters(): p.grad = torch.zeros_like(p)
        opt.zero_grad = lambda set_to_none=True, _z=opt.zero_grad: _z(set_to_none=False)
    rng = np.random.default_rng(0); out = []
    with compile_mode.using(mode):
        for _ in range(steps):
            b = [(rng.integers(0, 2048, (4, 256)), rng.integers(0, 2048, (4, 256))) for _ in range(ga)]
            l, n = st(b, tc.lr); out.append((round(float(l), 5), round(float(n), 5)))
    return out
for ga in (1, 2):
    for scope, mode, keep in [("block", "default", False), ("block", "reduce-overhead", False), ("whole", "default", False),
                              ("whole", "reduce-overhead", False), ("whole", "reduce-overhead", True)]:
        try:
            r = run(scope, mode, keep, ga)
        except Exception as e:
            r = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps({"ga": ga, "scope": scope, "mode": mode, "keep_grads": keep, "out": r}), flush=True)
