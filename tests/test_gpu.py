"""On a CUDA GPU (skipped on CPU machines, as in CI): the flash request resolves to a fused
kernel, which agrees with standard attention in bf16, and the summary's peak memory is CUDA's.
GPU figures themselves live in docs/BENCHMARKS.md."""

import pytest
import torch

from trainer import attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("H,KV,T,D", [(16, 16, 1024, 128), (8, 2, 257, 64)])
def test_flash_resolves_to_a_fused_kernel_that_matches_standard_in_bf16(H, KV, T, D):
    device = torch.device("cuda")
    resolved = attention.choose("flash", attention.AttentionShape(head_dim=D, n_heads=H, n_kv_heads=KV, dtype="bf16"),
                                device, reuse_verdict=False, time_kernels=False)
    assert resolved.kernel in attention.flash_candidates(device), resolved.rejected
    g = torch.Generator(device="cpu").manual_seed(T)
    q = torch.randn(2, H, T, D, generator=g)
    k, v = (torch.randn(2, KV, T, D, generator=g) for _ in range(2))
    want = attention.standard_attention(*(t.to(device) for t in (q, k, v)))  # fp32 on the GPU
    got = resolved.fn(*(t.to(device, torch.bfloat16) for t in (q, k, v)))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_cuda_peak_memory_is_what_the_summary_reports():
    from trainer.result import peak_memory_bytes

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    peak, kind = peak_memory_bytes(device)
    assert kind == "cuda_max_allocated" and peak >= x.numel()
