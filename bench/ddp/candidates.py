"""DDP's communication settings, each measured on the same model and step, without Ray.

    python3 -m bench.ddp.candidates OUT.json [--only 1gpu,base,...] [--profile]

Every variant spawns its own processes (one per GPU) that build the model as a training worker
does (``trainer.parallelize.build_replica``: on meta, drawn on the device, blocks compiled),
wrap it in plain ``DistributedDataParallel`` with ``parallelize.ddp_options()`` plus the
variant's change, and time ``trainer.step.Stepper`` on a fixed random batch of the ~0.95B
config (seq 4096 x 4):
median step after warm-up, tokens/s over all GPUs. Environment variables (NCCL's) are set
before the process group starts. ``--profile`` prints rank 0's CUDA kernel table for 3 steps.

Without CUDA it runs the same code on tiny shapes over gloo (a test of this script, not a
measurement). Results on two H200s: docs/BENCHMARKS.md, 2026-11-28, "DDP on two GPUs".
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from trainer import attention, parallelize
from trainer.config import ModelConfig, TrainConfig
from trainer.optim import build_optimizer
from trainer.step import Stepper

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama-0.95b.yaml"
# (name, GPUs, change): env (set before the process group), ddp (DDP keyword arguments),
# hook ("bf16": the bf16 compression hook), pg_high_priority (the NCCL stream's priority option).
VARIANTS = [
    ("1gpu", 1, {}),
    ("base", 2, {}),
    ("nccl_high_priority_env", 2, {"env": {"TORCH_NCCL_HIGH_PRIORITY": "1"}}),
    ("pg_high_priority_opt", 2, {"pg_high_priority": True}),
    ("nccl_max_channels_8", 2, {"env": {"NCCL_MAX_NCHANNELS": "8"}}),
    ("bucket_25", 2, {"ddp": {"bucket_cap_mb": 25}}),
    ("bf16_hook", 2, {"hook": "bf16"}),
    ("static_graph", 2, {"ddp": {"static_graph": True}}),
    ("nccl_proto_simple", 2, {"env": {"NCCL_PROTO": "Simple"}}),
    ("nccl_proto_ll128", 2, {"env": {"NCCL_PROTO": "LL128"}}),
]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank: int, world: int, port: int, change: dict):
    """(device, dtype, model config, train config) for this rank, its process group started."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(rank)
    if world > 1:
        kw = {}
        if change.get("pg_high_priority") and gpu:
            kw["pg_options"] = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        if gpu:
            kw["device_id"] = dev
        dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world, **kw)
    cfg = yaml.safe_load(CONFIG.read_text())
    if not gpu:  # tiny shapes: the script's own test
        cfg["model"].update(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=128)
        cfg["train"].update(seq_len=64, micro_batch_size=2, compile=False, dtype="fp32")
    return dev, (torch.bfloat16 if gpu else torch.float32), cfg


def _worker(rank: int, world: int, port: int, change: dict, steps: tuple[int, int], profile: bool, q) -> None:
    dev, dtype, cfg = _setup(rank, world, port, change)
    gpu = dev.type == "cuda"
    tc = TrainConfig(**cfg["train"])
    m = ModelConfig(**cfg["model"]).args(vocab_size=cfg["model"]["vocab_size"], max_seq_len=tc.seq_len,
                                         activation_checkpointing=tc.activation_checkpointing, loss_impl=tc.loss_impl)
    fn = attention.checked_fn("sdpa_cudnn" if gpu else "standard", device=dev, dtype=dtype, head_dim=m.head_dim,
                              n_heads=m.n_heads, n_kv_heads=m.n_kv_heads)
    raw = parallelize.build_replica(m, fn, device=dev, seed=0, compile=gpu)
    model = raw
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[rank] if gpu else None,
                                                          **{**parallelize.ddp_options(), **change.get("ddp", {})})
        if change.get("hook") == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    stepper = Stepper(model, build_optimizer(model, tc, dev), device=dev, dtype=dtype, grad_accum=1,
                      grad_clip=tc.grad_clip)
    rng = np.random.default_rng(rank)
    shape = (tc.micro_batch_size, tc.seq_len)
    batch = [(rng.integers(0, m.vocab_size, shape), rng.integers(0, m.vocab_size, shape))]
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    warmup, iters = steps
    times = []
    for _ in range(warmup + iters):
        sync()
        t = time.perf_counter()
        stepper(batch, tc.lr)
        sync()
        times.append(time.perf_counter() - t)
    table = None
    if profile:  # every rank steps (the collectives need both); rank 0 records
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof_ctx

        activities = [ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
        with prof_ctx(activities=activities) as prof:
            for _ in range(3):
                stepper(batch, tc.lr)
            sync()
        sort = "cuda_time_total" if gpu else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60)
    if rank == 0:
        step = statistics.median(times[warmup:])
        q.put({"step_s": step, "tok_s": world * tc.micro_batch_size * tc.seq_len / step,
               "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if gpu else None, "profile": table})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_variant(name: str, world: int, change: dict, *, steps: tuple[int, int] = (6, 20),
                profile: bool = False) -> dict:
    """One variant in fresh processes: its row, or its error."""
    saved = dict(os.environ)
    os.environ.update(change.get("env", {}))  # inherited by the spawned ranks
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t0 = time.time()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, change, steps, profile, q)) for r in range(world)]
    try:
        for p in procs:
            p.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    res = None
    while res is None and time.time() - t0 < TIMEOUT_S:
        try:
            res = q.get(timeout=2)
        except queue.Empty:  # still running, unless a rank died
            if any(p.exitcode not in (None, 0) for p in procs):
                res = {"error": f"exit codes {[p.exitcode for p in procs]}"}
    res = res or {"error": f"no result within {TIMEOUT_S} s"}
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return {"name": name, "world": world, **res, "wall_s": round(time.time() - t0, 1)}


def table(rows: list[dict]) -> list[str]:
    """Markdown rows, each variant's tokens/s over the one-GPU mean."""
    one = [r["tok_s"] for r in rows if r["world"] == 1 and "tok_s" in r]
    base = statistics.mean(one) if one else None
    lines = ["| variant | GPUs | tokens/s | scaling | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"| {r['name']} | {r['world']} | {r.get('error')} | | |")
            continue
        scaling = f"{r['tok_s'] / base:.3f}x" if base else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        lines.append(f"| {r['name']} | {r['world']} | {r['tok_s']:,.0f} | {scaling} | {peak} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.ddp.candidates", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="write every row here as JSON")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all): "
                   + ", ".join(v[0] for v in VARIANTS))
    p.add_argument("--profile", action="store_true", help="print rank 0's kernel table for 3 more steps")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    wanted = args.only.split(",") if args.only else [v[0] for v in VARIANTS]
    unknown = sorted(set(wanted) - {v[0] for v in VARIANTS})
    if unknown:
        p.error(f"--only: unknown variant(s) {', '.join(unknown)}")
    rows = []
    for name, world, change in VARIANTS:
        if name not in wanted:
            continue
        row = run_variant(name, world, change, steps=(args.warmup, args.iters), profile=args.profile)
        if row.get("profile"):
            print(f"== {name}: {world} GPU(s), 3 steps\n{row['profile']}", flush=True)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print("\n".join(table(rows)))
    return 0 if all("tok_s" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
