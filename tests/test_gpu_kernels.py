"""On a CUDA GPU (skipped on CPU machines): FA4 through the custom op agrees with standard
attention forward and backward in bf16 and compiles without a graph break; the kernel choice
by timing picks a kernel and records its timings; train.float8 trains. The CPU twins of these
tests are test_flash_op.py, test_attention_timing.py and test_float8.py."""

import importlib.util

import pytest
import torch

from trainer import attention
from trainer.attention import AttentionShape, cache
from trainer.attention import timing as kernel_select

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


needs_fa4 = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None
    or _capability()[0] < 9, reason="needs flash-attn-4 (flash_attn.cute) on a GPU of compute capability 9.0+")


def _qkv(H, KV, T, D, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(2, H, T, D, generator=g)
    k, v = (torch.randn(2, KV, T, D, generator=g) for _ in range(2))
    return q, k, v


def _fwd_bwd(fn, q0, k0, v0, dtype):
    q, k, v = (t.to("cuda", dtype).requires_grad_() for t in (q0, k0, v0))
    out = fn(q, k, v)
    out.float().pow(2).sum().backward()
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


@needs_fa4
@pytest.mark.parametrize("H,KV,T,D", [(16, 16, 1024, 128), (8, 2, 257, 64)])
def test_fa4_custom_op_matches_standard_forward_and_backward_in_bf16(H, KV, T, D):
    fa4 = attention.kernel_fn("flash_attn_4")
    q, k, v = _qkv(H, KV, T, D, seed=T)
    want_out, want_grads = _fwd_bwd(attention.standard_attention, q, k, v, torch.float32)
    got_out, got_grads = _fwd_bwd(fa4, q, k, v, torch.bfloat16)
    torch.testing.assert_close(got_out, want_out, atol=3e-2, rtol=3e-2)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=5e-2 * max(1.0, want.abs().max().item()), rtol=5e-2)


@needs_fa4
def test_fa4_custom_op_compiles_with_fullgraph_inside_the_attention_block():
    from trainer.model import Attention, ModelArgs, rotary_tables

    torch._dynamo.reset()
    args = ModelArgs(vocab_size=1, dim=1024, n_layers=1, n_heads=8, n_kv_heads=2, ffn_hidden=1, max_seq_len=512)
    block = Attention(args, attention.kernel_fn("flash_attn_4")).cuda()
    cos, sin = (t.cuda() for t in rotary_tables(args.head_dim, 512, args.rope_theta))
    compiled = torch.compile(block, fullgraph=True)  # a graph break raises here
    x = torch.randn(2, 512, 1024, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = block(x, cos, sin)
        got = compiled(x, cos, sin)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    got.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_native_gqa_sdpa_flash_matches_standard_in_bf16():
    fn = attention.checked_fn("sdpa_flash", device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=64,
                              n_heads=8, n_kv_heads=2)
    q, k, v = _qkv(8, 2, 300, 64)
    want_out, want_grads = _fwd_bwd(attention.standard_attention, q, k, v, torch.float32)
    got_out, got_grads = _fwd_bwd(fn, q, k, v, torch.bfloat16)
    torch.testing.assert_close(got_out, want_out, atol=3e-2, rtol=3e-2)
    assert [g.shape for g in got_grads] == [w.shape for w in want_grads]


def test_selection_by_timing_picks_the_fastest_passing_kernel_and_caches_it(tmp_path, monkeypatch):
    device = torch.device("cuda")
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(kernel_select, "device_memory", lambda device: None)  # the fused kernels alone
    shape = AttentionShape(seq_len=1024, micro_batch=4, n_heads=16, n_kv_heads=4, head_dim=64, dtype="bf16",
                           compile="true")
    r = attention.choose("flash", shape, device, reuse_verdict=False)
    assert r.kernel in attention.flash_candidates(device), r.rejected
    assert len(r.timings) >= 2 and all(ms > 0 for ms in r.timings.values()), r.timings
    assert r.kernel == min(r.timings, key=r.timings.get)
    assert kernel_select.describe(r.kernel, r.timings).startswith(f"kernel {r.kernel} (")

    def must_not_time(name, fn):
        raise AssertionError("a cache hit must not time again")

    again = attention.choose("flash", shape, device, reuse_verdict=False, timer=must_not_time)
    assert (again.kernel, again.timings) == (r.kernel, r.timings)


def test_with_the_gpus_memory_standard_attention_is_timed_among_the_fused_kernels(tmp_path, monkeypatch):
    device = torch.device("cuda")
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    shape = AttentionShape(seq_len=1024, micro_batch=8, n_heads=8, n_kv_heads=4, head_dim=64, dtype="bf16",
                           compile="true", n_layers=8)  # configs/llama-small-gpu.yaml
    r = attention.choose("flash", shape, device, reuse_verdict=False)
    assert "standard" in r.timings and len(r.timings) >= 3, r.timings
    assert r.kernel == min(r.timings, key=r.timings.get)
    assert (r.fn is attention.standard_attention) == (r.kernel == "standard")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None or _capability() < (8, 9),
                    reason="needs torchao and a GPU of compute capability 8.9+")
def test_float8_trains_a_few_steps_with_the_loss_going_down():
    from trainer import float8
    from trainer.model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=768, max_seq_len=128)
    model = Transformer(args, attention.kernel_fn("sdpa_flash"))
    float8.convert(model, torch.device("cuda"))
    assert sum(type(m).__name__ == "Float8Linear" for m in model.modules()) == 2 * 7  # wq wk wv wo w1 w2 w3 per layer
    model = torch.compile(model.cuda())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 512, (8, 128), device="cuda")
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(map(lambda l: l == l and l < 1e4, losses)) and losses[-1] < losses[0]
