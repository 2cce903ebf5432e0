"""Golden losses: a tiny CPU training (the worker's model, optimizer, schedule, sampler and step,
without Ray) must reproduce the recorded loss of every step, as torchtitan checks its runs.

The flash/standard parity check compares two kernels with each other, so a bug both share (in
the model, the optimizer, the schedule, the batches) passes it; this file catches such a bug.
Both kernels are held to the same recorded curve.

After a change that is meant to change the numbers, regenerate the file and say why in the
commit:

    python -m tests.test_golden_loss --regenerate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.attention import kernel_fn
from trainer.config import ModelConfig, TrainConfig
from trainer.dataset import BatchSampler, get_batch, num_windows
from trainer.model import Transformer
from trainer.optim import build_optimizer, lr_at
from trainer.step import Stepper

GOLDEN = Path(__file__).parent / "golden" / "tiny_cpu_losses.json"
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2}
TRAIN = {"seq_len": 32, "micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 20, "warmup_steps": 4,
         "lr": 3e-3, "min_lr": 3e-4, "seed": 1337, "dtype": "fp32", "compile": False}
VOCAB, NUM_TOKENS = 97, 4096
# fp32 on one thread repeats bit for bit on one machine; the margin covers other CPUs' kernels.
RTOL = 1e-5


def tokens() -> np.ndarray:
    """A fixed token array with structure to learn: a noisy repeating ramp."""
    rng = np.random.default_rng(0)
    ramp = np.arange(NUM_TOKENS) % VOCAB
    noise = rng.integers(0, VOCAB, NUM_TOKENS)
    return np.where(rng.random(NUM_TOKENS) < 0.8, ramp, noise).astype(np.uint16)


def train_losses(kernel: str) -> list[float]:
    """The loss of every step of the tiny run, as one CPU worker computes it."""
    mc, tc = ModelConfig(**MODEL), TrainConfig(**TRAIN)
    data, device = tokens(), torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order
    try:
        torch.manual_seed(tc.seed)
        model = Transformer(mc.args(vocab_size=VOCAB, max_seq_len=tc.seq_len), kernel_fn(kernel))
        stepper = Stepper(model, build_optimizer(model, tc, device), device=device, dtype=torch.float32,
                          grad_accum=tc.grad_accum_steps, grad_clip=tc.grad_clip)
        sampler = BatchSampler(seed=tc.seed, n_windows=num_windows(len(data), tc.seq_len),
                               micro_batch=tc.micro_batch_size, grad_accum=tc.grad_accum_steps, world_size=1)
        losses = []
        for step in range(tc.max_steps):
            batches = [get_batch(data, sampler.indices(step, micro, 0), tc.seq_len)
                       for micro in range(tc.grad_accum_steps)]
            loss, _ = stepper(batches, lr_at(step, tc))
            losses.append(loss.item())
        return losses
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", ["standard", "sdpa_flash_cpu"])
def test_tiny_cpu_run_reproduces_the_golden_loss_of_every_step(kernel):
    golden = json.loads(GOLDEN.read_text())
    assert (golden["model"], golden["train"]) == (MODEL, TRAIN), "the run changed: regenerate the golden file"
    losses = train_losses(kernel)
    for step, (got, want) in enumerate(zip(losses, golden["losses"], strict=True), start=1):
        assert got == pytest.approx(want, rel=RTOL), f"{kernel}: step {step} loss {got:.7f}, golden {want:.7f}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python -m tests.test_golden_loss --regenerate")
    GOLDEN.write_text(json.dumps({"model": MODEL, "train": TRAIN, "kernel": "standard",
                                  "losses": train_losses("standard")}, indent=2) + "\n")
    print(f"wrote {GOLDEN}")
