"""Held-out evaluation (``train.eval_every``, ``train.eval_batches``): the model's loss on fixed
batches of held-out windows, sharded across the workers.

The batches are a pure function of the held-out windows, ``train.micro_batch_size`` and
``train.eval_batches``: the same for every variant, every evaluation, every resume and every
worker count. Batch i runs on rank ``i % world``; each rank writes its batches' summed token
losses (fp32) into a vector that is all-reduced, a sum of one value and zeros per entry, so the
per-batch losses do not depend on how many workers computed them.

It runs in the training loop, on every rank, between steps: see docs/validation.md for why not
as Ray Train's asynchronous ``ValidationConfig`` task.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from trainer import location
from trainer.config import TrainConfig
from trainer.dataset import TokenDataset, get_batch, load_dataset, num_windows, training_windows
from trainer.step import to_device

Batch = tuple[np.ndarray, np.ndarray]  # inputs and targets, (B, T) int64


@dataclass(frozen=True)
class HeldOut:
    tokens: np.ndarray
    windows: np.ndarray  # the held-out window ids, in the data's order
    seq_len: int

    def batches(self, micro_batch: int, eval_batches: int) -> list[Batch]:
        """The first ``eval_batches`` runs of ``micro_batch`` held-out windows. A short last run is
        dropped where a full one exists: under torch.compile a new shape compiles again."""
        ids = self.windows[: micro_batch * eval_batches]
        if len(ids) >= micro_batch:
            ids = ids[: len(ids) // micro_batch * micro_batch]
        return [get_batch(self.tokens, ids[i:i + micro_batch], self.seq_len) for i in range(0, len(ids), micro_batch)]


def split(dataset: TokenDataset, seq_len: int, *, val_fraction: float,
          val_path: Optional[str]) -> tuple[int, Optional[HeldOut]]:
    """(the number of windows training samples, the held-out windows or None).

    With ``val_path`` the held-out windows are that whole dataset and training keeps all of
    ``dataset``; else the tail ``val_fraction`` of ``dataset`` is held out
    (``trainer.dataset.training_windows``)."""
    n = num_windows(len(dataset.tokens), seq_len)
    if val_path:
        val = load_dataset(location.fetched(val_path))  # a bucket's: this node's copy
        return n, HeldOut(val.tokens, np.arange(num_windows(len(val.tokens), seq_len)), seq_len)
    train = training_windows(n, val_fraction)
    return train, (HeldOut(dataset.tokens, np.arange(train, n), seq_len) if train < n else None)


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: list[Batch], *, device: torch.device, dtype: torch.dtype,
              rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch: (the summed token loss, the token count), fp32, the same on every rank."""
    n = len(batches)
    sums = torch.zeros(n, dtype=torch.float32, device=device)
    counts = torch.zeros(n, dtype=torch.float32, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    for first in range(0, n, world):
        i = first + rank
        # Every rank runs as many forwards: under FSDP each one gathers weights from all ranks.
        x, y = batches[i if i < n else 0]
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # under CUDA graphs: the last step's outputs are not read
        with autocast:
            _, loss = model(to_device(x, device), to_device(y, device))  # the mean over the batch's tokens, fp32
        if i < n:
            sums[i] = loss.float() * y.size
            counts[i] = y.size
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return sums, counts


def summary(sums: torch.Tensor, counts: torch.Tensor) -> dict:
    """The metrics of one evaluation: ``val_loss`` over every held-out token, its perplexity, and
    each batch's mean loss (what the comparison report pairs across variants)."""
    s, c = sums.double().tolist(), counts.double().tolist()
    val_loss = sum(s) / sum(c)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
            "val_batch_losses": [a / b for a, b in zip(s, c)], "val_tokens": int(sum(c))}


class Evaluator:
    """The evaluation of one worker's run: its batches, loaded once, and when it is due."""

    def __init__(self, heldout: Optional[HeldOut], tc: TrainConfig, *, device: torch.device, dtype: torch.dtype,
                 rank: int, world: int):
        self.every, self.last = tc.eval_every, tc.max_steps
        self.batches = heldout.batches(tc.micro_batch_size, tc.eval_batches) if heldout and tc.eval_every else []
        self.device, self.dtype, self.rank, self.world = device, dtype, rank, world

    def due(self, step: int) -> bool:
        """Every ``eval_every`` steps, and at the last step (the run's final held-out loss)."""
        return bool(self.batches) and (step % self.every == 0 or step == self.last)

    def __call__(self, model: torch.nn.Module) -> dict:
        started = time.perf_counter()
        out = summary(*loss_sums(model, self.batches, device=self.device, dtype=self.dtype, rank=self.rank,
                                 world=self.world))
        return {**out, "eval_s": time.perf_counter() - started}  # after a host sync (summary's tolist)
