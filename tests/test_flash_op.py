"""The custom-op wrapper that carries FA4 into torch.compile, tested on CPU with SDPA standing in
for the GPU kernel: no graph break under fullgraph=True, and forward and backward agree with
standard attention. The real FA4 through the same wrapper is in test_gpu_kernels.py."""

import math

import torch
import torch.nn.functional as F

from trainer import attention
from trainer.attention import flash_op, registry


def _ref_fwd(q, k, v, scale):
    """(B, T, nh, hs) in, (out, lse (B, nh, T)) out, as the flash_attn kernels return them."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    kr = kh.repeat_interleave(q.size(2) // k.size(2), dim=1)
    T = q.size(1)
    s = (qh.float() @ kr.float().transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return out.transpose(1, 2).contiguous(), torch.logsumexp(s, dim=-1)


def _ref_bwd(dout, q, k, v, out, lse, scale):
    """FlashAttention's backward from the saved lse (no autograd runs inside a custom op):
    P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = s dS K, dK = s dS^T Q."""
    rep = q.size(2) // k.size(2)
    qh, oh, doh = (t.transpose(1, 2).float() for t in (q, out, dout))
    kh, vh = (t.transpose(1, 2).float().repeat_interleave(rep, dim=1) for t in (k, v))
    T = q.size(1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    p = torch.exp(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")) - lse.unsqueeze(-1))
    dv = p.transpose(-1, -2) @ doh
    ds = p * (doh @ vh.transpose(-1, -2) - (doh * oh).sum(-1, keepdim=True))
    dq, dk = scale * ds @ kh, scale * ds.transpose(-1, -2) @ qh

    def per_kv_head(g):  # (B, nh, T, hs) -> (B, T, nkv, hs): a KV head's gradient sums over its query heads
        return g.unflatten(1, (-1, rep)).sum(2).transpose(1, 2).to(k.dtype)

    return dq.transpose(1, 2).to(q.dtype), per_kv_head(dk), per_kv_head(dv)


ATTN = flash_op.register("sdpa_reference", _ref_fwd, _ref_bwd)


def _inputs(H=8, KV=2, T=33, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, T, D, generator=g)
    k, v = (torch.randn(2, KV, T, D, generator=g) for _ in range(2))
    return q, k, v


def _fwd_bwd(fn, q0, k0, v0):
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = fn(q, k, v)
    out.pow(2).sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


def test_the_op_matches_standard_attention_forward_and_backward_with_native_gqa():
    q, k, v = _inputs()
    want_out, want_grads = _fwd_bwd(attention.standard_attention, q, k, v)
    got_out, got_grads = _fwd_bwd(ATTN, q, k, v)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-4)
    for got, want in zip(got_grads, want_grads):
        assert got.shape == want.shape  # dk, dv keep the KV heads: K and V were never repeated
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_op_compiles_with_fullgraph_and_keeps_the_gradients():
    torch._dynamo.reset()
    q, k, v = _inputs(T=17, seed=1)
    wq = torch.nn.Linear(16, 16, bias=False)

    def block(q, k, v):  # the op between other ops, as in the model
        return wq(ATTN(q * 1.5, k, v).transpose(1, 2)).sum(-1)

    want_out, want_grads = _fwd_bwd(block, q, k, v)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    got_out, got_grads = _fwd_bwd(compiled, q, k, v)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-4)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_op_passes_torch_library_opcheck():
    q, k, v = (t.transpose(1, 2).contiguous().requires_grad_() for t in _inputs(T=9, seed=2))
    op = torch.ops.flash_orchestrator.sdpa_reference_fwd.default
    torch.library.opcheck(op, (q, k, v, 1 / math.sqrt(16)))


def test_fa4_disk_cache_is_switched_on_unless_the_user_chose(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}  # in the user's cache, where the other caches are
    registry.enable_fa4_disk_cache(env)
    assert env == {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
                   "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(tmp_path / "xdg/flash-orchestrator/flash-attention-cute-dsl")}
    env = {"FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "0", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(tmp_path)}
    registry.enable_fa4_disk_cache(env)
    assert env["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "0" and env["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(tmp_path)
