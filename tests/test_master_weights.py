"""train.param_dtype: bf16 weights with fp32 master copies in the optimizer (trainer/master_weights.py).
A typed key whose bad combinations are config errors naming it, refused before launch where the
plan would compute in fp32; AdamW steps the fp32 masters exactly as it would fp32 weights; clipping
sees fp32 gradients; checkpoints keep the masters as the model's weights and AdamW's state keyed by
parameter name, loadable either way; and training tracks bf16 autocast over fp32 weights. Two
workers under DDP, resumed after a SIGKILL: tests/test_train_ray.py."""

import dataclasses

import pytest
import torch

from orchestrator import config as config_mod
from orchestrator import run as run_mod
from orchestrator.errors import UsageError
from orchestrator.plan import Plan, PlannedVariant
from trainer import checkpoint, master_weights
from trainer.attention import standard_attention
from trainer.config import TrainConfig
from trainer.master_weights import MasterWeights
from trainer.model import ModelArgs, Transformer
from trainer.optim import build_optimizer, optimizer_for
from trainer.parallel import weights_dtype
from trainer.parallel.fsdp import mixed_precision
from trainer.step import Stepper

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=16)
TC = TrainConfig(lr=1e-2, min_lr=1e-3, dtype="bf16")


def _model(seed=0, tie=False):
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(ARGS, tie_embeddings=tie), standard_attention)


def test_param_dtype_is_a_typed_key_and_its_bad_combinations_name_it():
    assert config_mod.validate({}, "x.yaml").train.param_dtype == "auto"
    assert config_mod.validate({"train": {"param_dtype": "bf16", "dtype": "bf16"}}, "x.yaml").train.param_dtype == "bf16"
    with pytest.raises(UsageError, match=r"train\.param_dtype"):
        config_mod.validate({"train": {"param_dtype": "fp16"}}, "x.yaml")
    with pytest.raises(UsageError, match=r"param_dtype bf16 needs bf16 compute; train\.dtype is fp32"):
        config_mod.validate({"train": {"param_dtype": "bf16", "dtype": "fp32"}}, "x.yaml")
    with pytest.raises(UsageError, match=r"param_dtype bf16 with float8: true is not supported"):
        config_mod.validate({"train": {"param_dtype": "bf16", "float8": True}}, "x.yaml")


def test_auto_is_bf16_only_where_fsdp_computes_in_bf16():
    assert weights_dtype("auto", "fsdp", "bf16") == "bf16"  # FSDP2's mixed precision: fp32 shards are the masters
    assert weights_dtype("auto", "fsdp", "fp32") == "fp32"
    assert weights_dtype("auto", "ddp", "bf16") == "fp32"  # autocast over fp32 weights, as before the key
    assert weights_dtype("bf16", "ddp", "bf16") == "bf16" and weights_dtype("fp32", "fsdp", "bf16") == "fp32"
    tc = TrainConfig(param_dtype="auto")  # dtype auto: bf16 on a GPU, fp32 on a CPU
    assert [weights_dtype(tc.param_dtype, "fsdp", tc.precision(d)) for d in ("cuda", "cpu")] == ["bf16", "fp32"]
    assert mixed_precision(torch.bfloat16).param_dtype == torch.bfloat16
    assert mixed_precision(torch.float32).param_dtype is None  # fp32 gathers, autocast casts


def test_bf16_weights_on_a_variant_planned_on_cpu_are_refused_before_launch_naming_the_key():
    cfg = config_mod.validate({"train": {"param_dtype": "bf16"}}, "x.yaml")  # dtype auto: fp32 on a CPU
    variants = config_mod.variant_configs(cfg, False, False)

    def plan(use_gpu):
        return Plan([PlannedVariant(name=variants[0].name, attention="flash", env={}, num_workers=2,
                                    use_gpu=use_gpu, cpus_per_worker=1, strategy="ddp")], "sequential")

    problem = run_mod.param_dtype_refusal(cfg, variants, plan(False))
    assert problem.startswith(f"variant {variants[0].name}: train.param_dtype bf16 needs bf16 compute")
    assert "set train.dtype bf16" in problem
    assert run_mod.param_dtype_refusal(cfg, variants, plan(True)) is None
    cpu_bf16 = config_mod.validate({"train": {"param_dtype": "bf16", "dtype": "bf16"}}, "x.yaml")
    assert run_mod.param_dtype_refusal(cpu_bf16, variants, plan(False)) is None


def test_the_masters_step_exactly_as_adamw_steps_fp32_weights_and_the_weights_are_their_rounding():
    fp32, bf16 = _model(), _model()
    master_weights.cast_parameters(bf16, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.rope_cos.dtype == torch.float32  # buffers stay fp32
    with torch.no_grad():  # the same start: the fp32 model at the bf16 rounding the masters begin from
        for a, b in zip(fp32.parameters(), bf16.parameters()):
            a.copy_(b.float())
    plain, masters = build_optimizer(fp32, TC, torch.device("cpu")), optimizer_for(bf16, TC, torch.device("cpu"))
    assert isinstance(masters, MasterWeights) and not isinstance(plain, MasterWeights)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for a, b in zip(fp32.parameters(), bf16.parameters()):
            g = torch.randn(a.shape, generator=gen).to(torch.bfloat16)  # gradients bf16 can hold exactly
            a.grad, b.grad = g.float(), g.clone()
        masters.take_grads()
        plain.step(), masters.step()
        plain.zero_grad(), masters.zero_grad()
    for a, m, b in zip(fp32.parameters(), masters.masters, bf16.parameters()):
        assert m.dtype == torch.float32 and torch.equal(m, a)  # bit for bit
        assert torch.equal(b, a.to(torch.bfloat16))
    assert all(p.grad is None for p in bf16.parameters()) and all(m.grad is None for m in masters.masters)


def test_clipping_sees_the_fp32_gradients_on_the_masters():
    model = _model()
    master_weights.cast_parameters(model, torch.bfloat16)
    opt = optimizer_for(model, TC, torch.device("cpu"))
    stepper = Stepper(model, opt, device=torch.device("cpu"), dtype=torch.bfloat16, grad_accum=1, grad_clip=1e-3)
    x = torch.randint(0, ARGS.vocab_size, (2, 16))
    before = [m.detach().clone() for m in opt.masters]
    _, norm = stepper([(x.numpy(), x.roll(-1, 1).numpy())], lr=1e-2)
    assert norm.dtype == torch.float32 and norm > 1e-3  # the unclipped norm, measured in fp32
    assert all(m.grad is None for m in opt.masters)  # zero_grad after the step
    assert any(not torch.equal(b, m) for b, m in zip(before, opt.masters))


@pytest.mark.parametrize("tie", [False, True])
def test_a_checkpoint_keeps_the_masters_as_the_model_weights_and_loads_either_way(tmp_path, tie):
    model = _model(tie=tie)
    master_weights.cast_parameters(model, torch.bfloat16)
    opt = optimizer_for(model, TC, torch.device("cpu"))
    assert [id(p) for g in opt.inner.param_groups for p in g["params"]] == [  # build_optimizer's groups, in order
        id(m) for m in opt.masters if m.dim() >= 2] + [id(m) for m in opt.masters if m.dim() < 2]
    for m in opt.masters:  # masters that bf16 cannot hold exactly
        m.data.add_(1e-4)
    state = checkpoint.sharded_state(model, opt)["model"]
    assert set(state) == set(model.state_dict()) and all(t.dtype == torch.float32 for t in state.values())
    names = dict(model.named_parameters())
    assert all(torch.equal(state[n], m) for n, m in zip(names, opt.masters))
    if tie:
        assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    x = torch.randint(0, ARGS.vocab_size, (2, 16))
    model(x, x)[1].backward()
    opt.take_grads(), opt.step()
    checkpoint.write(tmp_path, 0, {"step": 1}, sharded=checkpoint.sharded_state(model, opt))

    again = _model(seed=1, tie=tie)  # a resume: other weights, the same structure
    master_weights.cast_parameters(again, torch.bfloat16)
    opt2 = optimizer_for(again, TC, torch.device("cpu"))
    checkpoint.load(tmp_path, again, opt2)
    assert all(torch.equal(a, b) for a, b in zip(opt2.masters, opt.masters))  # exact, not through bf16
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(again.parameters(), opt2.masters))

    fp32 = _model(seed=2, tie=tie)  # the same checkpoint read by a run of fp32 weights, or by export
    plain = build_optimizer(fp32, TC, torch.device("cpu"))
    checkpoint.load(tmp_path, fp32, plain)
    assert all(torch.equal(p, m) for p, m in zip(fp32.parameters(), opt.masters))
    ours, theirs = checkpoint.sharded_state(again, opt2)["optimizer"], checkpoint.sharded_state(fp32, plain)["optimizer"]
    assert ours["state"].keys() == theirs["state"].keys() == set(names)  # AdamW's, by name
    assert all(torch.equal(ours["state"][n]["exp_avg"], theirs["state"][n]["exp_avg"]) for n in names)
    for group in opt2.param_groups:  # loaded, the inner AdamW has new group dicts: the step's lr still reaches it
        group["lr"] = 0.123
    assert [g["lr"] for g in opt2.inner.param_groups] == [0.123, 0.123]


def test_training_with_bf16_weights_tracks_autocast_over_fp32_weights():
    """Ten steps of the tiny model under bf16 autocast on a CPU: bf16 weights with fp32 masters
    against fp32 weights, the same init and batches (one batch, learned by heart). The losses
    stay within 1%."""
    torch.manual_seed(0)
    data = torch.randint(0, ARGS.vocab_size, (4, 17)).expand(10, 4, 17)
    losses = {}
    for dtype in ("fp32", "bf16"):
        model = _model()
        master_weights.cast_parameters(model, master_weights.torch_dtype(dtype))
        stepper = Stepper(model, optimizer_for(model, TC, torch.device("cpu")), device=torch.device("cpu"),
                          dtype=torch.bfloat16, grad_accum=1, grad_clip=1.0)
        losses[dtype] = [float(stepper([(b[:, :-1].numpy(), b[:, 1:].numpy())], lr=1e-2)[0]) for b in data]
    assert losses["bf16"][-1] < losses["bf16"][0] - 0.3  # it trains
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)


def test_the_memory_estimate_counts_bf16_weights_beside_their_masters():
    from orchestrator import memory

    tc = TrainConfig(dtype="bf16")
    n = memory.param_counts(ARGS)[0]
    fp32 = memory.estimate(ARGS, tc, strategy="ddp", world_size=2, attention="flash")
    bf16 = memory.estimate(ARGS, TrainConfig(dtype="bf16", param_dtype="bf16"), strategy="ddp", world_size=2,
                           attention="flash")
    assert (fp32.params, fp32.grads, fp32.optimizer, fp32.step_temp) == (4 * n, 4 * n, 8 * n, 0)
    assert (bf16.params, bf16.grads, bf16.optimizer, bf16.step_temp) == (6 * n, 2 * n, 8 * n, 4 * n)
    assert bf16.model_state == fp32.model_state  # 16 bytes per parameter either way
    # FSDP gathers in param_dtype: fp32 weights gather twice the bytes of bf16 ones.
    sharded = {p: memory.estimate(ARGS, TrainConfig(dtype="bf16", param_dtype=p), strategy="fsdp", world_size=2,
                                  attention="flash") for p in ("bf16", "fp32")}
    assert sharded["fp32"].gathered == 2 * sharded["bf16"].gathered > 0


def test_the_bench_refuses_bf16_weights_where_it_computes_in_fp32_and_records_what_ran():
    import numpy as np

    from bench import training
    from trainer.config import ModelConfig

    m = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2)
    tokens = np.random.default_rng(0).integers(0, 64, 4096).astype(np.uint16)
    kw = dict(model_cfg=m, tokens=tokens, vocab_size=64, device=torch.device("cpu"), warmup=1, iters=1)
    refused = training.bench_variant("flash", train_cfg=TrainConfig(seq_len=16, micro_batch_size=2, param_dtype="bf16"), **kw)
    assert refused["status"] == "error" and refused["error"].startswith("train.param_dtype bf16 needs bf16 compute")
    ran = training.bench_variant("flash", train_cfg=TrainConfig(seq_len=16, micro_batch_size=2, dtype="bf16",
                                                                param_dtype="bf16"), **kw)
    assert ran["status"] == "ok" and ran["param_dtype"] == "bf16" and ran["dtype"] == "bfloat16"
