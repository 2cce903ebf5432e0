"""DDP's communication settings, each measured on the same model and step, without Ray.

    python3 -m bench.ddp.candidates OUT.json [--only 1gpu,base,...] [--profile]

Every variant spawns its own processes (one per GPU) that build the model as a training worker
does (``trainer.parallelize.build_replica``: on meta, drawn on the device, blocks compiled),
wrap it in plain ``DistributedDataParallel`` with ``ddp.options()`` plus the
variant's change, and time ``trainer.step.Stepper`` on a fixed random batch of the ~0.95B
config (seq 4096 x 4):
median step after warm-up, tokens/s over all GPUs. Environment variables (NCCL's) are set
before the process group starts. ``--profile`` prints rank 0's CUDA kernel table for 3 steps.
Each row also says whether the ranks still hold the same weights at the end (``in_sync``: a
variant that reduced the gradients wrongly leaves them apart), the last step's loss, the
environment rank 0 saw, and, with compiled blocks, how many graphs dynamo made and how many
graph breaks it hit (a change that splits the compiled blocks shows there).

Without CUDA it runs the same code on tiny shapes over gloo (a test of this script, not a
measurement); DDP's mixed precision (``ddp_mp`` rows) then runs with stand-ins for the device
events and streams the CPU has not (``_cpu_event_stand_ins``). Results on two H200s:
docs/benchmarks-log/2026-11.md, 2026-11-28, "DDP on two GPUs".
"""

from __future__ import annotations

import argparse
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

from trainer import attention, master_weights, parallelize, strict_json
from trainer.config import ModelConfig, TrainConfig
from trainer.optim import optimizer_for
from trainer.parallel import ddp
from trainer.step import Stepper, to_device

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama-0.95b.yaml"
# (name, GPUs, change): env (set before the process group), ddp (DDP keyword arguments),
# hook ("bf16": the bf16 compression hook), pg_high_priority (the NCCL stream's priority option),
# ddp_mp (DDP's own mixed precision, a key of DDP_MP: the parameters cast to bf16 for forward and
# backward, so the gradients come out, and are all-reduced, in bf16 with no hook's casts; the
# step's autocast stays on; DDP wraps even one GPU, for that row's reference; see DDP_MP),
# weights ("bf16_master": bf16 parameters, fp32 master weights in the optimizer: trainer.master_weights, train.param_dtype bf16),
# timeout_s (this row's limit, default TIMEOUT_S), independent (no process group and no DDP: each
# GPU trains on its own, at the same time, so the row is what two GPUs of this host do with no
# communication at all: the ceiling any DDP setting can reach here).
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
    ("nccl_nthreads_256", 2, {"env": {"NCCL_NTHREADS": "256"}}),  # fewer threads per NCCL block
    # NCCL user-buffer registration of the caching allocator's segments (the buckets included).
    ("nccl_register_alloc", 2, {"env": {"TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK": "1"}}),
    ("cuda_max_connections_1", 2, {"env": {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}}),  # one hardware queue
    ("nccl_min_channels_32", 2, {"env": {"NCCL_MIN_NCHANNELS": "32"}}),  # more channels: faster, less exposed
    # DDP's own mixed precision also changes the compute (bf16 weights, so a bf16 residual stream
    # and no autocast casts of the weights): its one-GPU row, the same DDP on one rank, is the
    # reference that isolates what the second GPU costs (table()). Longer limit: the compiled
    # blocks are split at DDP's per-module hooks (DDP_MP), more graphs to compile the first time.
    ("1gpu_mp_bf16", 1, {"ddp_mp": "bf16", "timeout_s": 420}),
    ("ddp_mp_bf16", 2, {"ddp_mp": "bf16", "timeout_s": 420}),
    ("ddp_mp_bf16_fp32_reduce", 2, {"ddp_mp": "bf16_fp32", "timeout_s": 420}),
    # bf16 parameters, AdamW on fp32 master copies (trainer.master_weights.MasterWeights): gradients come out, and
    # plain DDP all-reduces them, in bf16, with no hook and no per-module hooks in the
    # compiled blocks (Megatron's and DeepSpeed's bf16 recipe). The compute changes too (a bf16
    # residual stream), so its one-GPU row is the same-precision reference (table()).
    ("1gpu_bf16_master", 1, {"weights": "bf16_master"}),
    ("bf16_master", 2, {"weights": "bf16_master"}),
    # Fewer, later all-reduces: the whole model in one bucket reduces once the backward is done,
    # exposed but beside no GEMM (the overlapped all-reduce slows the backward's GEMMs by ~13%,
    # profile of 2026-11-28 07:59 UTC); 400 MB: a few buckets, the last one exposed.
    ("one_bucket", 2, {"ddp": {"bucket_cap_mb": 8192}}),
    ("bf16_master_one_bucket", 2, {"weights": "bf16_master", "ddp": {"bucket_cap_mb": 8192}}),
    ("bf16_master_bucket_400", 2, {"weights": "bf16_master", "ddp": {"bucket_cap_mb": 400}}),
    ("bf16_master_proto_simple", 2, {"weights": "bf16_master", "env": {"NCCL_PROTO": "Simple"}}),
    ("bf16_master_max_channels_8", 2, {"weights": "bf16_master", "env": {"NCCL_MAX_NCHANNELS": "8"}}),
    ("independent", 2, {"independent": True}),
    ("independent_bf16_master", 2, {"independent": True, "weights": "bf16_master"}),
]
TIMEOUT_S = 240
# ddp_mp: (param_dtype, reduce_dtype) of torch.nn.parallel.distributed._MixedPrecision (private,
# "experimental"; torch 2.13), buffer_dtype = param_dtype (the rotary tables go bf16 too). What
# torch 2.13 does with it, and what this script does about it:
# - Before each forward DDP casts every parameter into a bf16 copy (``param.data`` swapped, on a
#   side stream) and puts a pre-forward hook on every module that waits for that copy and hooks
#   the bf16 parameter's gradient accumulator; after each bucket's all-reduce a comm hook
#   upcasts the gradients to fp32 and swaps the fp32 parameters back (the optimizer steps fp32).
# - Those hooks run inside the compiled blocks (``Module.compile`` compiles ``_call_impl``, hooks
#   and all), and dynamo does not trace them (stream and event calls, ``grad_fn`` access, hook
#   registration): a graph break in every module, the blocks split into smaller graphs. On the
#   CPU (inductor, two blocks): 11 graphs and 12 breaks a rank, against 1 graph and none under
#   plain DDP; on a GPU the row's graphs / graph_breaks say. Gradients stay right (checked on
#   the CPU against a bf16 replica, eager exactly and compiled to rounding).
# - gradient_as_bucket_view must be off: with it on, the upcast (``p.grad.data = ...``) swaps
#   the storage of the bucket view itself, later gradients are copied into that detached tensor,
#   and from the third backward on every all-reduce sums stale bucket contents: wrong gradients,
#   the same on every rank (in_sync cannot see it), bf16 or fp32 reduce. Forced off for these
#   rows (ddp_kwargs); the upcast makes new fp32 gradients every step anyway.
# - The first backward reduces garbage: DDP switches its buckets to bf16 after building them
#   (``Reducer::set_mixed_precision_param_dtype`` replaces each bucket's tensor, its views still
#   point into the old one), so the first all-reduce sums memory no gradient was copied into.
#   The buckets are rebuilt, right, after that backward: one forward and backward before the
#   first step, gradients dropped (_prime), keeps the garbage out of the weights.
# - Tied weights (not this config) fail: the shared parameter is hooked by two modules, "marked
#   as ready twice".
DDP_MP = {"bf16": (torch.bfloat16, torch.bfloat16), "bf16_fp32": (torch.bfloat16, torch.float32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_kwargs(change: dict) -> dict:
    """DistributedDataParallel's keyword arguments for a variant (device_ids aside)."""
    options = {**ddp.options(), **change.get("ddp", {})}
    if change.get("ddp_mp"):
        from torch.nn.parallel.distributed import _MixedPrecision

        param, reduce = DDP_MP[change["ddp_mp"]]
        # Bucket views last: they break DDP's mixed precision whatever the variant asks (DDP_MP).
        options.update(mixed_precision=_MixedPrecision(param_dtype=param, reduce_dtype=reduce, buffer_dtype=param),
                       gradient_as_bucket_view=False)
    return options


def _prime(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> None:
    """One forward and backward under DDP's mixed precision, its gradients dropped: the first
    backward reduces garbage, and rebuilds the buckets right for every later one (DDP_MP)."""
    with autocast:
        _, loss = model(x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _cpu_event_stand_ins() -> None:
    """DDP's mixed precision orders its casts with device events and the current stream
    (``torch.Event().record()``: "cpu backend doesn't support events";
    ``torch.accelerator.current_stream()``: none without an accelerator). On the CPU every op
    runs in program order, so events and waits that do nothing are exact. This process only
    (a spawned rank of a ddp_mp row), never on a GPU."""

    class Event(torch.Event):
        def record(self, stream=None):
            pass

        def wait(self, stream=None):
            pass

        def synchronize(self):
            pass

    class Stream:
        def wait_stream(self, stream):
            pass

        def wait_event(self, event):
            pass

    torch.Event = Event
    torch.accelerator.current_stream = lambda device=None: Stream()


def _replicas_agree(model: torch.nn.Module) -> bool:
    """Whether every rank ends with the same weights (DDP's point): the sum and norm of each
    parameter, gathered from every rank, compared exactly."""
    mine = torch.stack([torch.stack((p.detach().float().sum(), p.detach().float().norm()))
                        for p in model.parameters()])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(torch.equal(every[0], other) for other in every[1:])


def _setup(rank: int, world: int, port: int, change: dict):
    """(device, dtype, model config, train config) for this rank, its process group started."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda", rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(rank)
    if change.get("independent"):  # a CPU-only group, for the ranks' step times at the end
        dist.init_process_group("gloo", rank=rank, world_size=world)
    elif world > 1 or change.get("ddp_mp"):  # ddp_mp wraps one GPU too
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
    mp_kind = change.get("ddp_mp")
    if mp_kind and not gpu:
        _cpu_event_stand_ins()
    tc = TrainConfig(**cfg["train"])
    m = ModelConfig(**cfg["model"]).args(vocab_size=cfg["model"]["vocab_size"], max_seq_len=tc.seq_len,
                                         activation_checkpointing=tc.activation_checkpointing, loss_impl=tc.loss_impl)
    fn = attention.checked_fn("sdpa_cudnn" if gpu else "standard", device=dev, dtype=dtype, head_dim=m.head_dim,
                              n_heads=m.n_heads, n_kv_heads=m.n_kv_heads)
    raw = parallelize.build_replica(m, fn, device=dev, seed=0, compile=gpu)
    master = change.get("weights") == "bf16_master"
    if master:  # the parameters only: the rotary tables stay fp32, as under autocast (train.param_dtype bf16)
        master_weights.cast_parameters(raw, torch.bfloat16)
    model = raw
    if (world > 1 or mp_kind) and not change.get("independent"):
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[rank] if gpu else None,
                                                          **ddp_kwargs(change))
        if change.get("hook") == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    optimizer = optimizer_for(raw, tc, dev)  # AdamW on fp32 masters where the weights are bf16
    stepper = Stepper(model, optimizer, device=dev, dtype=dtype, grad_accum=1, grad_clip=tc.grad_clip)
    rng = np.random.default_rng(rank)
    shape = (tc.micro_batch_size, tc.seq_len)
    batch = [(rng.integers(0, m.vocab_size, shape), rng.integers(0, m.vocab_size, shape))]
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if mp_kind:
        _prime(model, to_device(batch[0][0], dev), to_device(batch[0][1], dev), stepper.autocast)
    warmup, iters = steps
    times = []
    for i in range(warmup + iters):
        if i == warmup and change.get("independent"):  # the ranks' timed steps run at the same time
            dist.barrier()
        sync()
        t = time.perf_counter()
        loss, _ = stepper(batch, tc.lr)
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
    independent = change.get("independent")
    in_sync = _replicas_agree(model) if world > 1 and not independent else None  # every rank takes part
    step = statistics.median(times[warmup:])
    if independent:  # each rank trained on its own: the slower one is the pace a synchronous run would keep
        paces = [None] * world
        dist.all_gather_object(paces, step)
        step = max(paces)
    if rank == 0:
        row = {"step_s": step, "tok_s": world * tc.micro_batch_size * tc.seq_len / step,
               "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if gpu else None,
               "in_sync": in_sync, "loss": float(loss), "env": {k: os.environ.get(k) for k in change.get("env", {})}}
        if gpu:  # blocks compiled (build_replica(compile=gpu))
            from torch._dynamo.utils import counters

            row.update(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
        q.put({**row, "profile": table})
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_variant(name: str, world: int, change: dict, *, steps: tuple[int, int] = (6, 20),
                profile: bool = False) -> dict:
    """One variant in fresh processes: its row, or its error."""
    saved = dict(os.environ)
    os.environ.update(change.get("env", {}))  # inherited by the spawned ranks
    limit = change.get("timeout_s", TIMEOUT_S)
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
    while res is None and time.time() - t0 < limit:
        try:
            res = q.get(timeout=2)
        except queue.Empty:  # still running, unless a rank died
            if any(p.exitcode not in (None, 0) for p in procs):
                res = {"error": f"exit codes {[p.exitcode for p in procs]}"}
    res = res or {"error": f"no result within {limit} s"}
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    mp_kind = {k: change[k] for k in ("ddp_mp", "weights") if change.get(k)}
    return {"name": name, "world": world, **mp_kind, **res, "wall_s": round(time.time() - t0, 1)}


def _precision(row: dict) -> str | None:
    """What a row changes in the compute besides the communication (None: nothing): bf16
    weights under DDP's mixed precision (whatever its reduce dtype), or bf16 master weights."""
    return "ddp_mp" if row.get("ddp_mp") else row.get("weights")


def table(rows: list[dict]) -> list[str]:
    """Markdown rows, each variant's tokens/s over the one-GPU mean (of the plain one-GPU rows:
    a ddp_mp or bf16_master row changes the compute too); then each two-GPU row of those over
    the one-GPU mean of the same precision."""
    one = [r["tok_s"] for r in rows if r["world"] == 1 and "tok_s" in r and not _precision(r)]
    base = statistics.mean(one) if one else None
    lines = ["| variant | GPUs | tokens/s | scaling | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"| {r['name']} | {r['world']} | {r.get('error')} | | |")
            continue
        scaling = f"{r['tok_s'] / base:.3f}x" if base else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        lines.append(f"| {r['name']} | {r['world']} | {r['tok_s']:,.0f} | {scaling} | {peak} |")
    for kind in dict.fromkeys(_precision(r) for r in rows if _precision(r)):
        one_mp = [r for r in rows if r["world"] == 1 and "tok_s" in r and _precision(r) == kind]
        if not one_mp:
            continue
        ref = statistics.mean(r["tok_s"] for r in one_mp)
        names = ", ".join(r["name"] for r in one_mp)
        lines += [f"{r['name']}: {r['tok_s'] / ref:.3f}x of {names} (the same bf16 weights on one GPU)"
                  for r in rows if r["world"] > 1 and "tok_s" in r and _precision(r) == kind]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.ddp.candidates", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="write every row here as JSON")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all): "
                   + ", ".join(v[0] for v in VARIANTS))
    p.add_argument("--profile", action="store_true", help="print rank 0's kernel table for 3 more steps")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1,
                   help="run the chosen variants this many times, in turn (the run-to-run spread)")
    args = p.parse_args(argv)
    wanted = args.only.split(",") if args.only else [v[0] for v in VARIANTS]
    unknown = sorted(set(wanted) - {v[0] for v in VARIANTS})
    if unknown:
        p.error(f"--only: unknown variant(s) {', '.join(unknown)}")
    rows = []
    chosen = [v for v in VARIANTS if v[0] in wanted]
    for round_ in range(1, args.rounds + 1):
        for name, world, change in chosen:
            row = {**run_variant(name, world, change, steps=(args.warmup, args.iters), profile=args.profile),
                   "round": round_}
            if row.get("profile"):
                print(f"== {name}: {world} GPU(s), 3 steps\n{row['profile']}", flush=True)
            rows.append(row)
            print(strict_json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            args.out.write_text(strict_json.dumps(rows, indent=1))
    print("\n".join(table(rows)))
    return 0 if all("tok_s" in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
