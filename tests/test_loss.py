"""train.loss_impl: the chunked head + cross-entropy gives the standard loss and gradients, tied or
untied, under autocast, compiled and under DDP; liger is refused on CPU naming the key."""

import sys

import pytest
import torch
import torch.nn.functional as F

from orchestrator import config as config_mod
from orchestrator.errors import UsageError
from trainer import loss
from trainer.attention import standard_attention
from trainer.config import ModelConfig
from trainer.model import Transformer

VOCAB = 97


def _model(impl: str, tie: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tie).args(
        vocab_size=VOCAB, max_seq_len=32, loss_impl=impl)
    return Transformer(args, standard_attention)


def _grads(model: Transformer, x, y) -> tuple[float, dict[str, torch.Tensor]]:
    _, value = model(x, y)
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_chunked_loss_and_every_gradient_match_standard_in_fp32(tie, monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_LOGITS", 8 * VOCAB)  # 8 tokens a chunk: 3 x 21 tokens -> 8 chunks, the last short
    assert loss.chunk_tokens(VOCAB) == 8
    x, y = torch.randint(0, VOCAB, (3, 21)), torch.randint(0, VOCAB, (3, 21))
    ref_loss, ref = _grads(_model("standard", tie), x, y)
    got_loss, got = _grads(_model("chunked", tie), x, y)
    assert got_loss == pytest.approx(ref_loss, rel=1e-6)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_returns_no_logits_and_standard_keeps_returning_them():
    x, y = torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9))
    logits, _ = _model("standard", True)(x, y)
    assert logits.shape == (2, 9, VOCAB)
    none, value = _model("chunked", True)(x, y)
    assert none is None and value.ndim == 0
    # Without targets (generate, export) every impl returns the logits.
    assert _model("chunked", True)(x).shape == (2, 9, VOCAB)


def test_chunked_matches_the_bf16_autocast_standard_loss_within_bf16_rounding():
    h = torch.randn(40, 64, requires_grad=True)
    head = torch.nn.Linear(64, VOCAB, bias=False)
    t = torch.randint(0, VOCAB, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref = loss.linear_cross_entropy("standard", h[None], head, t[None])
        _, got = loss.linear_cross_entropy("chunked", h[None], head, t[None])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-3)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, head.weight))
    gh, gw = torch.autograd.grad(got, (h, head.weight))
    assert gw.dtype == torch.float32  # the fp32 master weight gets an fp32 gradient
    torch.testing.assert_close(gh, gh_ref, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=1e-4)


def test_chunked_scales_its_gradients_by_the_incoming_gradient():
    h = torch.randn(10, 16, requires_grad=True)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    t = torch.randint(0, VOCAB, (10,))
    _, once = loss.linear_cross_entropy("chunked", h[None], head, t[None])
    (g1,) = torch.autograd.grad(once, h)
    _, again = loss.linear_cross_entropy("chunked", h[None], head, t[None])
    (g3,) = torch.autograd.grad(3 * again, h)  # gradient accumulation divides the loss the same way
    torch.testing.assert_close(g3, 3 * g1)


def test_chunked_without_grad_computes_the_loss_only():
    h, t = torch.randn(10, 16), torch.randint(0, VOCAB, (10,))
    head = torch.nn.Linear(16, VOCAB, bias=False)
    with torch.no_grad():
        _, got = loss.linear_cross_entropy("chunked", h[None], head, t[None])
        ref = F.cross_entropy(head(h), t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_chunked_compiles_in_one_graph_with_the_same_loss_and_grads(monkeypatch):
    monkeypatch.setattr(loss, "CHUNK_LOGITS", 4 * VOCAB)
    h = torch.randn(2, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    t = torch.randint(0, VOCAB, (2, 7))

    def fn(h):
        return loss.linear_cross_entropy("chunked", h, head, t)[1]

    ref = fn(h)
    (g_ref,) = torch.autograd.grad(ref, h)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)  # no graph break, without a C++ build
    got = compiled(h)
    (g,) = torch.autograd.grad(got, h)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g, g_ref)


def test_liger_on_cpu_is_a_clear_error_naming_the_key():
    with pytest.raises(ValueError, match=r"^train\.loss_impl: liger needs a CUDA GPU .* runs on cpu"):
        loss.check("liger", torch.device("cpu"))
    loss.check("chunked", torch.device("cpu"))
    loss.check("standard", torch.device("cpu"))


def test_loss_impl_is_a_typed_train_key_defaulting_to_standard():
    assert config_mod.validate({}, "x.yaml").train.loss_impl == "standard"
    assert config_mod.validate({"train": {"loss_impl": "chunked"}}, "x.yaml").train.loss_impl == "chunked"
    with pytest.raises(UsageError, match=r"x\.yaml: train\.loss_impl: .*'standard', 'chunked' or 'liger'.*fused"):
        config_mod.validate({"train": {"loss_impl": "fused"}}, "x.yaml")


def test_compile_mode_is_a_typed_train_key_and_sets_inductors_options_for_its_duration():
    import torch._inductor.config as inductor_config

    from trainer import compile_mode

    assert config_mod.validate({}, "x.yaml").train.compile_mode == "default"
    with pytest.raises(UsageError, match=r"train\.compile_mode: .*'reduce-overhead'"):
        config_mod.validate({"train": {"compile_mode": "max-autotune"}}, "x.yaml")
    before = inductor_config.max_autotune
    with compile_mode.using("max-autotune-no-cudagraphs"):
        assert inductor_config.max_autotune is True and inductor_config.coordinate_descent_tuning is True
    assert inductor_config.max_autotune == before
    assert compile_mode.options("default") == {}


def _distributed_worker(rank: int, world: int, port: int, out: str) -> None:
    """Per strategy and impl, one backward over this rank's batch; rank 0 saves the reduced grads."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainer import parallel
    from trainer.model import ModelArgs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss.CHUNK_LOGITS = 8 * VOCAB  # several chunks (the spawned process does not see the parent's monkeypatch)
    try:
        x = torch.arange(2 * 16).reshape(2, 16).add(rank * 5) % VOCAB
        grads = {}
        for impl in ("standard", "chunked"):
            args = ModelArgs(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                             max_seq_len=16, tie_embeddings=False, loss_impl=impl)
            torch.manual_seed(3)
            ddp = DistributedDataParallel(Transformer(args, standard_attention))
            ddp(x, x.roll(-1, 1))[1].backward()
            grads[("ddp", impl)] = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}
            fsdp, _ = parallel.get("fsdp").build(args, standard_attention, device=torch.device("cpu"),
                                                 seed=3, compile=False, world_size=world)
            fsdp(x, x.roll(-1, 1))[1].backward()
            grads[("fsdp", impl)] = {n: p.grad.full_tensor() for n, p in fsdp.named_parameters()}
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.ray  # not Ray, but two spawned torch processes: too slow for the unit loop
def test_chunked_gives_the_standard_gradients_under_ddp_and_fsdp(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_parallelize import _free_port

    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path / "grads.pt")), nprocs=2)
    grads = torch.load(tmp_path / "grads.pt")
    for strategy in ("ddp", "fsdp"):
        ref, got = grads[(strategy, "standard")], grads[(strategy, "chunked")]
        assert ref.keys() == got.keys() and "output.weight" in ref
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=f"{strategy} {name}")


def test_the_compiled_chunk_of_gpu_runs_gives_the_standard_loss_and_grads(monkeypatch):
    # On CUDA each chunk's math is compiled with Inductor; here the same path with aot_eager on CPU.
    monkeypatch.setattr(loss, "CHUNK_LOGITS", 8 * VOCAB)
    monkeypatch.setattr(loss, "COMPILE_ON", ("cpu",))
    monkeypatch.setattr(loss, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(loss, "_compiled", {})
    torch._dynamo.reset()
    x, y = torch.randint(0, VOCAB, (3, 21)), torch.randint(0, VOCAB, (3, 21))
    ref_loss, ref = _grads(_model("standard", False), x, y)
    got_loss, got = _grads(_model("chunked", False), x, y)
    assert "aot_eager" in loss._compiled  # the compiled path really ran
    assert got_loss == pytest.approx(ref_loss, rel=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("train,expected", [
    ({}, ("standard", None, None)),
    ({"loss_impl": "chunked", "compile_mode": "max-autotune-no-cudagraphs", "float8": True},
     ("chunked", "max-autotune-no-cudagraphs", "tensorwise"))])
def test_the_variant_record_says_which_loss_compile_mode_and_float8_recipe_ran(tmp_path, train, expected):
    from orchestrator.results import VariantResult
    from trainer.config import TrainConfig
    from trainer.worker_spec import WorkerSpec
    from trainer import builder
    from trainer.result import Progress, worker_result

    compiled = "compile_mode" in train
    spec = WorkerSpec(variant="flash", model=ModelConfig(), train=TrainConfig(**train, compile=compiled),
                      data_path="d", out_dir=str(tmp_path))
    s = builder.settings(spec.model, spec.train, strategy="ddp", vocab_size=64, device=torch.device("cpu"))
    record = worker_result(spec, s, Progress(), requested="flash", kernel="sdpa_flash_cpu", kernel_timings=None,
                           env={}, workers=[], params=1, timeline={})
    rec = VariantResult(status="succeeded", **{k: v for k, v in record.items() if k != "variant"})
    assert (rec.loss_impl, rec.compile_mode, rec.float8_recipe) == expected


LIGER_MODULE = "liger_kernel.transformers.fused_linear_cross_entropy"


def test_loss_impl_auto_runs_liger_where_it_imports_on_a_cuda_device(monkeypatch):
    import types

    fake = types.ModuleType(LIGER_MODULE)
    fake.LigerFusedLinearCrossEntropyLoss = object
    monkeypatch.setitem(sys.modules, LIGER_MODULE, fake)
    assert loss.resolve("auto", torch.device("cuda")) == ("liger", "auto: liger-kernel imports on this CUDA device")


def test_loss_impl_auto_runs_standard_without_liger_or_on_a_cpu_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, LIGER_MODULE, None)  # not installed: its import fails
    impl, why = loss.resolve("auto", torch.device("cuda"))
    assert impl == "standard" and why.startswith("auto: liger needs a working liger-kernel (pip install liger-kernel")
    assert loss.resolve("auto", torch.device("cpu")) == (
        "standard", "auto: liger needs a CUDA GPU (liger-kernel is Triton); this worker runs on cpu")


@pytest.mark.parametrize("impl", ["standard", "chunked", "liger"])
def test_a_loss_impl_the_user_gave_is_kept_whatever_is_installed(monkeypatch, impl):
    monkeypatch.setitem(sys.modules, LIGER_MODULE, None)
    assert loss.resolve(impl, torch.device("cuda")) == (impl, None)


def test_the_variant_record_says_which_loss_and_micro_batch_auto_resolved_to_and_why(tmp_path):
    from orchestrator.results import VariantResult
    from trainer.config import TrainConfig
    from trainer.worker_spec import WorkerSpec
    from trainer import builder
    from trainer.result import Progress, worker_result

    planned = {"train.micro_batch_size": "12 (auto: largest that fits 71.68 GiB ...)"}
    spec = WorkerSpec(variant="flash", model=ModelConfig(), train=TrainConfig(micro_batch_size=12, loss_impl="auto"),
                      data_path="d", out_dir=str(tmp_path), auto=planned)
    s = builder.settings(spec.model, spec.train, strategy="ddp", vocab_size=64, device=torch.device("cpu"))
    assert (s.train.loss_impl, s.model.loss_impl) == ("standard", "standard")  # what the model computes
    record = worker_result(spec, s, Progress(), requested="flash", kernel="sdpa_flash_cpu", kernel_timings=None,
                           env={}, workers=[], params=1, timeline={})
    rec = VariantResult(status="succeeded", **{k: v for k, v in record.items() if k != "variant"})
    assert (rec.loss_impl, rec.micro_batch_size) == ("standard", 12)
    assert rec.auto == {**planned, "train.loss_impl": "standard (auto: liger needs a CUDA GPU (liger-kernel is "
                                                      "Triton); this worker runs on cpu)"}
