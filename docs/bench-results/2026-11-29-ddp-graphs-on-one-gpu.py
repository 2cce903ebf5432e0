# p6: DDP with the whole model compiled under reduce-overhead (CUDA graphs), on a GPU: two ranks on one H200
# over gloo (NCCL refuses two ranks on one GPU), against eager DDP: losses, weights, ranks in sync.
import os, sys, time, json
import numpy as np
import torch
import torch.multiprocessing as mp

def rank_main(rank, port, whole, q):
    import torch.distributed as dist
    from trainer import attention, compile_mode, parallelize
    from trainer.config import TrainConfig
    from trainer.model_args import ModelArgs
    from trainer.optim import build_optimizer
    from trainer.step import Stepper
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cpu = os.environ.get("P6_CPU") == "1"
    dev = torch.device("cpu") if cpu else torch.device("cuda", 0)
    if not cpu: torch.cuda.set_device(dev)
    args = ModelArgs(vocab_size=512, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=512, max_seq_len=128)
    fn = attention.standard_attention if cpu else attention.checked_fn("sdpa_cudnn", device=dev, dtype=torch.bfloat16, head_dim=64, n_heads=4, n_kv_heads=2)
    raw = parallelize.build_replica(args, fn, device=dev, seed=0, compile=False)
    model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=None if cpu else [0], **parallelize.ddp_options())
    if whole:
        parallelize.compile_whole(model)
    tc = TrainConfig(lr=1e-3, grad_accum_steps=2)
    stepper = Stepper(model, build_optimizer(raw, tc, dev), device=dev, dtype=torch.bfloat16, grad_accum=2, grad_clip=1.0,
                      compiled=False, cudagraphs=whole)
    rng = np.random.default_rng(rank)
    losses, t0 = [], time.time()
    with compile_mode.using("reduce-overhead" if whole else "default"):
        for _ in range(6):
            batches = [(rng.integers(0, 512, (4, 128)), rng.integers(0, 512, (4, 128))) for _ in range(2)]
            losses.append(float(stepper(batches, tc.lr)[0]))
    q.put((rank, losses, [p.detach().float().cpu().numpy().copy() for p in raw.parameters()], round(time.time() - t0, 1)))
    dist.destroy_process_group()

if __name__ == "__main__":
    from bench.ddp.candidates import _free_port
    runs = {}
    for whole in (True, False):
        ctx = mp.get_context("spawn"); q = ctx.Queue(); port = _free_port()
        procs = [ctx.Process(target=rank_main, args=(r, port, whole, q)) for r in range(2)]
        [p.start() for p in procs]
        try:
            got = [q.get(timeout=200) for _ in procs]
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive(): p.kill()
        runs[whole] = {r: (l, ps, t) for r, l, ps, t in got}
        print("whole" if whole else "eager", {r: (v[0], v[2]) for r, v in runs[whole].items()}, flush=True)
    ok = True
    for r in (0, 1):
        (cl, cp, _), (el, ep, _) = runs[True][r], runs[False][r]
        dl = max(abs(a - b) / abs(b) for a, b in zip(cl, el))
        dp = max(float(np.abs(c - e).max()) for c, e in zip(cp, ep))
        sync = all(np.array_equal(c, o) for c, o in zip(cp, runs[True][1 - r][1]))
        print(f"rank {r}: max rel loss diff vs eager {dl:.2e}, max weight diff {dp:.2e}, ranks in sync {sync}")
        ok &= dl < 2e-2 and sync and all(np.isfinite(cl))
    print("PASS" if ok else "FAIL")
