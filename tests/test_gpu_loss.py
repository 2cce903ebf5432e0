"""On a CUDA GPU (skipped on CPU machines): the fused head + cross-entropy (train.loss_impl chunked,
with its Inductor-compiled chunks, and liger when liger-kernel is installed) against the standard
loss in bf16 autocast, its memory, and float8's recipe on the ~0.95B shapes."""

import pytest
import torch

from trainer import loss

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB, DIM, TOKENS = 32000, 2048, 8192


def _inputs():
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(2, TOKENS // 2, DIM, generator=g) * 2).cuda().requires_grad_()
    head = torch.nn.Linear(DIM, VOCAB, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02, generator=g)
    head = head.cuda()
    t = torch.randint(0, VOCAB, (2, TOKENS // 2), generator=g).cuda()
    return h, head, t


def _loss_and_grads(impl, h, head, t):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, value = loss.linear_cross_entropy(impl, h, head, t)
    gh, gw = torch.autograd.grad(value, (h, head.weight))
    torch.cuda.synchronize()
    return value.item(), gh, gw, torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_fused_loss_matches_standard_in_bf16_and_peaks_lower(impl):
    if impl == "liger" and loss.liger_problem(torch.device("cuda")):
        pytest.skip(loss.liger_problem(torch.device("cuda")))
    h, head, t = _inputs()
    ref, gh_ref, gw_ref, mem_ref = _loss_and_grads("standard", h, head, t)
    got, gh, gw, mem = _loss_and_grads(impl, h, head, t)
    assert got == pytest.approx(ref, rel=2e-3)
    assert gw.dtype == torch.float32
    # bf16 matmuls on both sides: agreement to a few % of each gradient's largest entry
    torch.testing.assert_close(gh.float(), gh_ref.float(), rtol=5e-2, atol=2e-2 * gh_ref.abs().max().item())
    torch.testing.assert_close(gw, gw_ref, rtol=5e-2, atol=2e-2 * gw_ref.abs().max().item())
    # standard keeps bf16 logits, their fp32 copy and the log-softmax: >= 10 bytes per logit
    assert mem < mem_ref / 2, (mem, mem_ref)


def test_float8_converts_with_the_recorded_recipe_on_hopper():
    from trainer import float8
    from trainer.attention import standard_attention
    from trainer.model import ModelArgs, Transformer

    if float8.refusal(True, [".".join(map(str, torch.cuda.get_device_capability()))]):
        pytest.skip("float8 needs compute capability 8.9+")
    pytest.importorskip("torchao", reason="float8 needs torchao (pip install 'flash-orchestrator[float8]')")
    model = Transformer(ModelArgs(vocab_size=256, dim=256, n_layers=1, n_heads=4, n_kv_heads=4, ffn_hidden=512,
                                  max_seq_len=64, tie_embeddings=False), standard_attention).cuda()
    float8.convert(model, torch.device("cuda"))
    converted = {type(m).__name__ for n, m in model.named_modules() if n.startswith("layers.0.")}
    assert "Float8Linear" in converted and type(model.output).__name__ == "Linear"
    cfg = model.layers[0].attn.wq.config
    assert cfg.cast_config_weight.scaling_granularity.value == float8.RECIPE


@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_a_compiled_bf16_bench_step_with_the_fused_loss_starts_at_the_standard_loss(impl):
    from orchestrator import config as config_mod, preprocess
    from bench import training
    from trainer import dataset as dataset_mod

    if impl == "liger" and loss.liger_problem(torch.device("cuda")):
        pytest.skip(loss.liger_problem(torch.device("cuda")))
    cfg = config_mod.validate({"model": {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                         "vocab_size": 32000, "tie_embeddings": False},
                               "train": {"seq_len": 256, "micro_batch_size": 4, "dtype": "bf16", "compile": True}},
                              "gpu test")
    data = dataset_mod.load_dataset(preprocess.embedded_dataset())
    rows = {}
    for name in ("standard", impl):
        tc = cfg.train.model_copy(update={"loss_impl": name})
        rows[name] = training.bench_variant("flash", model_cfg=cfg.model, train_cfg=tc, tokens=data.tokens,
                                            vocab_size=data.vocab_size, device=torch.device("cuda"), warmup=1,
                                            iters=3)
    assert rows[impl]["status"] == "ok", rows[impl].get("error")
    assert rows[impl]["loss_impl"] == impl and rows[impl]["loss_finite"]
    assert rows[impl]["first_loss"] == pytest.approx(rows["standard"]["first_loss"], rel=1e-2)
