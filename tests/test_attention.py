"""The two attention implementations compute the same function (outputs and gradients)."""

import pytest
import torch

from trainer import attention
from trainer.attention import AttentionShape, kernels


def _qkv(B, H, KV, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, KV, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, KV, T, D, generator=g, dtype=torch.float64)
    return q, k, v


def _reference(q, k, v):
    """An independent float64 reference: per head, a masked softmax over the past."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        s = q[:, h] @ k[:, h // rep].transpose(-1, -2) / D**0.5
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ v[:, h // rep]
    return out


@pytest.mark.parametrize("H,KV,T,D", [(4, 4, 17, 16), (8, 2, 33, 32), (6, 3, 1, 8), (4, 1, 129, 64)])
def test_standard_matches_float64_reference(H, KV, T, D):
    q, k, v = _qkv(2, H, KV, T, D)
    torch.testing.assert_close(attention.standard_attention(q, k, v), _reference(q, k, v))


@pytest.mark.parametrize("H,KV,T,D", [(4, 4, 17, 16), (8, 2, 33, 32), (4, 1, 127, 64), (6, 2, 5, 8)])
def test_flash_matches_standard_forward_and_backward_in_fp32(H, KV, T, D):
    q0, k0, v0 = (t.float() for t in _qkv(2, H, KV, T, D, seed=T))
    resolved = attention.choose("flash", AttentionShape(head_dim=D, n_heads=H, n_kv_heads=KV, dtype="fp32"),
                                torch.device("cpu"), reuse_verdict=False, time_kernels=False)
    assert resolved.kernel == "sdpa_flash_cpu"
    outs, grads = [], []
    for fn in (attention.standard_attention, resolved.fn):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = fn(q, k, v)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    for g_flash, g_std in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_flash, g_std, atol=1e-4, rtol=1e-4)


def test_attention_is_causal_future_tokens_do_not_change_the_past():
    q, k, v = (t.float() for t in _qkv(1, 4, 2, 20, 16))
    full = attention.kernel_fn("sdpa_flash_cpu")(q, k, v)
    prefix = attention.kernel_fn("sdpa_flash_cpu")(q[:, :, :10], k[:, :, :10], v[:, :, :10])
    torch.testing.assert_close(full[:, :, :10], prefix, atol=1e-5, rtol=1e-5)


def test_standard_request_resolves_to_the_standard_kernel():
    r = attention.choose("standard", AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2, dtype="fp32"),
                         torch.device("cpu"))
    assert (r.kernel, r.rejected) == ("standard", {})


def test_unknown_attention_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match="flash, standard"):
        attention.choose("fast", AttentionShape(head_dim=16, n_heads=4, n_kv_heads=4, dtype="fp32"),
                         torch.device("cpu"))


def test_a_kernel_that_computes_the_wrong_thing_is_rejected_by_the_check():
    def wrong(q, k, v):
        return attention.standard_attention(q, k, v) * 1.01

    with pytest.raises(RuntimeError, match="differs from standard"):
        attention.check_kernel(wrong, device=torch.device("cpu"), dtype=torch.float32,
                               head_dim=16, n_heads=4, n_kv_heads=2)


@pytest.mark.parametrize("H,KV", [(8, 2), (6, 1)])
def test_gqa_is_passed_natively_without_copying_k_and_v_and_matches_standard(monkeypatch, H, KV):
    q0, k0, v0 = (t.float() for t in _qkv(2, H, KV, 33, 16, seed=H))
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    want = attention.standard_attention(q, k, v)
    want.pow(2).sum().backward()
    want_grads = [t.grad for t in (q, k, v)]

    def no_copies(x, n_rep):
        raise AssertionError(f"K/V repeated {n_rep}x: GQA was not passed natively")

    fn = attention.checked_fn("sdpa_flash_cpu", device=torch.device("cpu"), dtype=torch.float32,
                              head_dim=16, n_heads=H, n_kv_heads=KV)
    monkeypatch.setattr(kernels, "_repeat_kv", no_copies)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    got = fn(q, k, v)
    got.pow(2).sum().backward()
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)
    for g, w in zip((q.grad, k.grad, v.grad), want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_an_sdpa_kernel_refusing_native_gqa_is_kept_with_k_and_v_repeated(monkeypatch):
    real = torch.nn.functional.scaled_dot_product_attention

    def no_gqa(*args, enable_gqa=False, **kwargs):
        if enable_gqa:
            raise RuntimeError("No available kernel. Aborting execution.")
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention", no_gqa)
    fn = attention.checked_fn("sdpa_flash_cpu", device=torch.device("cpu"), dtype=torch.float32,
                              head_dim=16, n_heads=8, n_kv_heads=2)
    q, k, v = (t.float() for t in _qkv(1, 8, 2, 9, 16))
    torch.testing.assert_close(fn(q, k, v), attention.standard_attention(q, k, v), atol=1e-5, rtol=1e-4)


def test_fa2_in_a_flash_attn_4_only_namespace_is_not_installed_not_an_error(monkeypatch):
    """flash-attn-4 alone installs ``flash_attn`` with only ``.cute``: FA2 is then unavailable,
    as a missing package is (bench rows say "unavailable"), with the message preflight classifies."""
    import sys
    import types

    from orchestrator.preflight import rules

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    with pytest.raises(ImportError) as err:
        attention.kernel_fn("flash_attn_2")
    assert "flash-attn-4 alone" in str(err.value)
    assert rules.classify(str(err.value)).code == "not_installed"
