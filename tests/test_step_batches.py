"""A batch's way to the device: contiguous, so the pinned copy is what is transferred."""

import numpy as np
import pytest
import torch

from trainer.dataset import get_batch
from trainer.step import to_device

TOKENS = np.arange(200, dtype=np.uint16)


def test_a_batch_reaches_the_device_contiguous_with_its_values():
    x, y = get_batch(TOKENS, np.array([3, 0, 5]), 16)
    assert not x.flags["C_CONTIGUOUS"]  # inputs and targets are views of the same rows
    for a in (x, y):
        t = to_device(a, torch.device("cpu"))
        assert t.is_contiguous() and t.dtype == torch.int64 and np.array_equal(t.numpy(), a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_batch_goes_up_from_pinned_memory(monkeypatch):
    pinned = []
    real = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(self.is_contiguous()) or real(self, *a))
    x, _ = get_batch(TOKENS, np.array([3, 0, 5]), 16)
    t = to_device(x, torch.device("cuda"))
    assert pinned == [True] and t.is_cuda and t.is_contiguous()
    assert np.array_equal(t.cpu().numpy(), x)
