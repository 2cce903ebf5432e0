"""train.compile_mode: reduce-overhead, the compiled blocks replayed as CUDA graphs: a typed key,
refused before launch where FSDP would shard the variant, told to the probe (so its kernel timing
and the node's cache key follow it), and every step and every timing iteration a new graph step.
The graphs themselves need a GPU: tests/test_gpu_cudagraphs.py."""

import json

import pytest
import torch

from orchestrator import config as config_mod
from orchestrator import run as run_mod
from orchestrator.errors import UsageError
from orchestrator.plan import Plan, PlannedVariant
from orchestrator.preflight import probe
from orchestrator.preflight.child import probe_command
from orchestrator.preflight.settings import ProbeSettings, settings_for
from trainer import attention, compile_mode, parallel
from trainer.attention import AttentionShape, cache
from trainer.attention import timing as kernel_select
from trainer.parallel import ddp
from trainer.parallel.fsdp import cudagraphs_refusal
from trainer.model import ModelArgs, Transformer
from trainer.optim import build_optimizer
from trainer.step import Stepper


def test_reduce_overhead_is_a_train_compile_mode_that_uses_cuda_graphs():
    cfg = config_mod.validate({"train": {"compile_mode": "reduce-overhead"}}, "x.yaml")
    assert cfg.train.compile_mode == "reduce-overhead"
    assert compile_mode.uses_cudagraphs("reduce-overhead")
    assert not compile_mode.uses_cudagraphs("default") and not compile_mode.uses_cudagraphs("max-autotune-no-cudagraphs")
    assert compile_mode.options("reduce-overhead") == {"triton.cudagraphs": True}  # what PyTorch's mode sets
    # Graphs really replay only for compiled blocks on a GPU.
    assert compile_mode.replays("reduce-overhead", compiled=True, device_type="cuda")
    assert not compile_mode.replays("reduce-overhead", compiled=False, device_type="cuda")
    assert not compile_mode.replays("reduce-overhead", compiled=True, device_type="cpu")
    assert not compile_mode.replays("default", compiled=True, device_type="cuda")
    with pytest.raises(UsageError, match=r"train\.compile_mode"):
        config_mod.validate({"train": {"compile_mode": "cudagraphs"}}, "x.yaml")


def _plan(cfg, strategy, reason=None, use_gpu=True):
    variants = config_mod.variant_configs(cfg, False, False)
    plan = Plan([PlannedVariant(name=variants[0].name, attention="flash", env={}, num_workers=2, use_gpu=use_gpu,
                                cpus_per_worker=1, strategy=strategy, strategy_reason=reason)], "sequential")
    return variants, plan


def test_cuda_graphs_on_a_variant_fsdp_shards_is_refused_naming_the_variant_the_key_and_why():
    cfg = config_mod.validate({"train": {"compile_mode": "reduce-overhead"}}, "x.yaml")
    variants, plan = _plan(cfg, "fsdp", "the model would not fit replicated")
    problem = run_mod.cudagraphs_refusal(cfg, variants, plan)
    assert problem.startswith(f"variant {variants[0].name}: train.compile_mode reduce-overhead (CUDA graphs)")
    assert "the model would not fit replicated" in problem and "scaling.strategy ddp" in problem
    assert cudagraphs_refusal("reduce-overhead") in problem  # the words a worker's backstop raises too
    assert run_mod.cudagraphs_refusal(cfg, *_plan(cfg, "ddp")) is None
    plain = config_mod.validate({}, "x.yaml")
    assert run_mod.cudagraphs_refusal(plain, *_plan(plain, "fsdp")) is None
    # Where the worker would replay no graph (CPU workers, or blocks not compiled), nothing to refuse.
    assert run_mod.cudagraphs_refusal(cfg, *_plan(cfg, "fsdp", use_gpu=False)) is None
    eager = config_mod.validate({"train": {"compile_mode": "reduce-overhead", "compile": False}}, "x.yaml")
    assert run_mod.cudagraphs_refusal(eager, *_plan(eager, "fsdp")) is None


def test_the_probe_is_told_of_cuda_graphs_and_the_nodes_cache_key_follows():
    base = config_mod.validate({"train": {"seq_len": 64}}, "x.yaml")
    graphs = config_mod.validate({"train": {"seq_len": 64, "compile_mode": "reduce-overhead"}}, "x.yaml")
    plain = settings_for(base, config_mod.variant_configs(base, False, False), False)
    replayed = settings_for(graphs, config_mod.variant_configs(graphs, False, False), False)
    assert (plain.shape.cudagraphs, replayed.shape.cudagraphs) == (False, True)
    shapes = [json.loads(argv[argv.index("--shape") + 1]) for argv in map(probe_command, (plain, replayed))]
    assert (shapes[0]["cudagraphs"], shapes[1]["cudagraphs"]) == (False, True)
    assert cache.node_key(plain.shape, False, environ={}) != cache.node_key(replayed.shape, False, environ={})
    args = probe.build_parser().parse_args(probe_command(replayed)[3:])
    assert args.shape.cudagraphs is True and probe.build_parser().parse_args([]).shape.cudagraphs is False


def test_a_shape_replays_cuda_graphs_only_when_compiled_and_its_cache_key_says_so():
    margs = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=16)
    train = lambda **kw: config_mod.validate({"train": {"seq_len": 16, "micro_batch_size": 2, **kw}}, "x.yaml").train
    of = lambda **kw: AttentionShape.of_run(train(**kw), margs)
    assert of(compile=True, compile_mode="reduce-overhead").replays("cuda") is True
    assert of(compile=False, compile_mode="reduce-overhead").replays("cuda") is False  # eager blocks: no graphs
    assert (cache.node_key(of(compile=True, compile_mode="reduce-overhead"), False, environ={})
            != cache.node_key(of(compile=True), False, environ={}))


def _spy_steps(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        lambda: marks.append(torch._inductor.config.triton.cudagraphs))
    return marks


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_each_training_step_starts_a_new_graph_step_only_under_cuda_graphs(monkeypatch, cudagraphs):
    marks = _spy_steps(monkeypatch)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                  max_seq_len=8), lambda q, k, v: q)
    tc = config_mod.validate({}, "x.yaml").train
    stepper = Stepper(model, build_optimizer(model, tc, torch.device("cpu")), device=torch.device("cpu"),
                      dtype=torch.float32, grad_accum=2, grad_clip=1.0, cudagraphs=cudagraphs)
    batch = [(torch.randint(0, 64, (2, 8)).numpy(), torch.randint(0, 64, (2, 8)).numpy())] * 2
    for _ in range(3):
        stepper(batch, 1e-3)
    assert len(marks) == (3 if cudagraphs else 0)  # once a step, not once a micro-batch


def test_the_timer_under_cuda_graphs_starts_a_graph_step_each_iteration_with_inductors_graphs_on(monkeypatch):
    marks = _spy_steps(monkeypatch)
    shape = AttentionShape(seq_len=16, micro_batch=2, n_heads=4, n_kv_heads=2, head_dim=8, dtype="fp32",
                           compile="false", n_layers=2, ffn_hidden=64, cudagraphs=True)
    from trainer.attention import standard_attention

    before = torch._inductor.config.triton.cudagraphs
    ms = kernel_select.block_timer(shape, torch.device("cpu"), warmup=1, iters=2, cudagraphs=True)(
        "standard", standard_attention)
    assert ms > 0 and len(marks) >= 3 and all(marks)  # every iteration, under the mode's Inductor option
    assert torch._inductor.config.triton.cudagraphs == before  # and the mode ends with the timing


def test_a_worker_looks_up_the_verdict_under_the_key_the_driver_probed_with(tmp_path, monkeypatch):
    # The worker passes the settings as configured (train.compile "auto", CUDA graphs asked for)
    # whatever its device makes of them, as the driver's settings do: the same node key.
    from trainer.attention import choice

    cfg = config_mod.validate({"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
                               "train": {"seq_len": 32, "micro_batch_size": 2, "compile_mode": "reduce-overhead"}})
    driver = settings_for(cfg, config_mod.variant_configs(cfg, False, False), False)
    seen = []
    monkeypatch.setattr(choice.cache, "path_for", lambda shape, disabled: seen.append(shape) or tmp_path / "none.json")
    margs = cfg.model.args(vocab_size=64, max_seq_len=32, activation_checkpointing=cfg.train.activation_checkpointing)
    # As trainer/loop.py calls it.
    attention.choose("flash", AttentionShape.of_run(cfg.train, margs), torch.device("cpu"), log_dir=tmp_path)
    assert probe_command(ProbeSettings(shape=seen[0])) == probe_command(driver)


@pytest.mark.parametrize("beside", [True, False])
def test_the_check_runs_beside_the_build_or_under_cuda_graphs_here_before_it(beside):
    import threading

    from trainer import overlap

    looked_up, built = threading.Event(), threading.Event()
    events = []

    def resolve():
        events.append(("resolve", threading.current_thread() is threading.main_thread()))
        looked_up.set()
        assert built.wait(5)  # a timing waits for the build
        events.append(("timed", None))
        return "kernel"

    def build():
        events.append(("build", looked_up.is_set()))
        return "model"

    assert overlap.resolve_beside_build(resolve, build, looked_up=looked_up, built=built, beside=beside) == (
        "kernel", "model")
    if beside:  # in a helper thread, the build here once the verdict was looked up
        assert ("resolve", False) in events and ("build", True) in events
    else:  # here, and whole, before the build: Inductor's CUDA-graph state is per thread
        assert events == [("resolve", True), ("timed", None), ("build", True)]


# ---------------------------------------------------------------- the whole model as one graph


def test_reduce_overhead_compiles_the_whole_model_except_under_fsdp_and_the_record_says_which():
    assert compile_mode.whole_model("reduce-overhead", "ddp")
    assert not compile_mode.whole_model("reduce-overhead", "fsdp")  # FSDP's hooks sit between the blocks
    assert not compile_mode.whole_model("default", "ddp")
    assert not compile_mode.whole_model("max-autotune-no-cudagraphs", "ddp")
    assert compile_mode.scope("reduce-overhead", "ddp", compiled=True) == "model"
    assert compile_mode.scope("reduce-overhead", "fsdp", compiled=True) == "block"
    assert compile_mode.scope("default", "ddp", compiled=True) == "block"
    assert compile_mode.scope("reduce-overhead", "ddp", compiled=False) is None


def _spy_compiles(monkeypatch) -> list:
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append(type(self).__name__))
    return compiled


@pytest.mark.parametrize("whole", [True, False])
def test_a_worker_compiles_the_whole_model_once_or_each_block(monkeypatch, whole):
    from trainer import attention

    compiled = _spy_compiles(monkeypatch)
    args = ModelArgs(vocab_size=64, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=16)
    model, raw = parallel.get("ddp").build(args, attention.standard_attention, device=torch.device("cpu"),
                                           seed=0, compile=True, world_size=1, whole_graph=whole)
    assert compiled == (["Transformer"] if whole else ["Block"] * 3)
    assert model is raw


@pytest.mark.parametrize("cudagraphs", [True, False])
def test_the_timer_compiles_its_blocks_as_one_graph_under_cuda_graphs_as_the_model_compiles(monkeypatch, cudagraphs):
    from trainer.attention import standard_attention

    compiled = _spy_compiles(monkeypatch)
    shape = AttentionShape(seq_len=16, micro_batch=2, n_heads=4, n_kv_heads=2, head_dim=8, dtype="fp32",
                           compile="true", n_layers=4, ffn_hidden=64, cudagraphs=cudagraphs)
    kernel_select.block_timer(shape, torch.device("cpu"), warmup=1, iters=1, cudagraphs=cudagraphs)(
        "standard", standard_attention)
    assert compiled == (["_Stack"] if cudagraphs else ["Block"] * kernel_select.MAX_TIMED_BLOCKS)


def _whole_ddp_rank(rank: int, port: int, whole: bool, q) -> None:
    import os

    import numpy as np
    import torch.distributed as dist

    from trainer import attention, parallelize
    from trainer.config import TrainConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cpu = torch.device("cpu")
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=16)
    raw = parallelize.build_replica(args, attention.standard_attention, device=cpu, seed=0, compile=False)
    model = torch.nn.parallel.DistributedDataParallel(raw, **ddp.options())
    if whole:
        parallelize.compile_whole(model)
    tc = TrainConfig(lr=1e-2, grad_accum_steps=2)
    stepper = Stepper(model, build_optimizer(raw, tc, cpu), device=cpu, dtype=torch.float32, grad_accum=2,
                      grad_clip=1.0, no_sync=parallel.get("ddp").no_sync)
    rng = np.random.default_rng(rank)  # each rank its own data: the all-reduce matters
    losses = []
    with compile_mode.using("reduce-overhead" if whole else "default"):
        for _ in range(3):
            batches = [(rng.integers(0, 64, (2, 16)), rng.integers(0, 64, (2, 16))) for _ in range(2)]
            losses.append(float(stepper(batches, tc.lr)[0]))
    q.put((rank, losses, [p.detach().numpy().copy() for p in raw.parameters()]))  # not tensors: no fds
    dist.destroy_process_group()


def test_ddp_with_the_whole_model_compiled_trains_as_eager_ddp_with_gradient_accumulation():
    # The whole-model graph under DDP (dynamo splits it at DDP's buckets) and no_sync on the first
    # micro-step: the same losses and the same weights on both ranks as eager DDP.
    import numpy as np
    import torch.multiprocessing as mp

    from bench.ddp.candidates import _free_port

    runs = {}
    for whole in (True, False):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_whole_ddp_rank, args=(r, port, whole, q)) for r in range(2)]
        for proc in procs:
            proc.start()
        try:
            runs[whole] = dict((rank, (losses, params)) for rank, losses, params in (q.get(timeout=240) for _ in procs))
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
    for rank in (0, 1):
        (c_losses, c_params), (e_losses, e_params) = runs[True][rank], runs[False][rank]
        assert c_losses == pytest.approx(e_losses, rel=1e-4)
        for c, e, other in zip(c_params, e_params, runs[True][1 - rank][1]):
            np.testing.assert_allclose(c, e, rtol=1e-3, atol=1e-4)  # a wrong step would be off by lr (1e-2)
            np.testing.assert_array_equal(c, other)  # the ranks stay in sync
