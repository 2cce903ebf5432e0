"""The worker's token dataset: a flat array of token ids (``tokens.bin``) plus a JSON header
(``meta.json``), memory-mapped, and the batches drawn from it.

The header names the tokenizer, vocab size, dtype and token count; it is written last (by
``orchestrator/preprocess.py``), so a directory with a header is complete. Batches are a pure
function of (seed, step, rank), so a resumed run sees exactly the batches it would have seen,
and two variants with one seed see the same data in the same order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
META_FILE, TOKENS_FILE, TOKENIZER_FILE = "meta.json", "tokens.bin", "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"  # a user's SentencePiece model, copied with the data


class DataError(ValueError):
    """Bad or missing data; the message names the file and what is wrong."""


# ---------------------------------------------------------------- reading a dataset


@dataclass
class TokenDataset:
    path: Path
    meta: dict
    tokens: np.ndarray  # memory-mapped, 1-D

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


def load_dataset(path: str | Path) -> TokenDataset:
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise DataError(f"{path}: data directory not found")
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; run 'python -m orchestrator preprocess' to make a dataset")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        count, vocab = int(meta["num_tokens"]), int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: corrupt header ({type(e).__name__}: {e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    tokens_path = path / TOKENS_FILE
    if not tokens_path.is_file():
        raise DataError(f"{tokens_path}: missing")
    size = tokens_path.stat().st_size
    if size == 0 or count <= 1:
        raise DataError(f"{tokens_path}: empty dataset")
    if size != count * dtype.itemsize:
        raise DataError(f"{tokens_path}: {size} bytes, but the header promises {count} {dtype.name} tokens ({count * dtype.itemsize} bytes)")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
    # Spot-check ids against the vocab: a mismatched tokenizer or a corrupt file shows here.
    sample = np.asarray(tokens[:: max(1, count // 4096)])
    if sample.max() >= vocab:
        raise DataError(f"{tokens_path}: token id {int(sample.max())} is outside the vocab of {vocab}")
    return TokenDataset(path, meta, tokens)


# The tokens hashed for a fingerprint: their first and last MiB, so a dataset of GBs costs
# milliseconds; a corpus rewritten in place to the same size differs there.
FINGERPRINT_SPAN = 1 << 20


def fingerprint(ds: TokenDataset) -> dict:
    """What tells this dataset from another, cheaply (``train --resume`` compares them): the
    header's facts and a hash of the header, the tokenizer file and the ends of the tokens."""
    h = hashlib.sha256((ds.path / META_FILE).read_bytes())
    tokenizer_file = ds.meta["tokenizer"].get("file")
    if tokenizer_file:
        h.update((ds.path / tokenizer_file).read_bytes())
    raw = ds.tokens.view(np.uint8)
    h.update(raw[:FINGERPRINT_SPAN].tobytes() + raw[-FINGERPRINT_SPAN:].tobytes())
    return {"path": str(ds.path.resolve()), "num_tokens": len(ds.tokens), "vocab_size": ds.vocab_size,
            "sha256": h.hexdigest()}


def describe_fingerprint(fp: dict) -> str:
    return f"{fp['path']} ({fp['num_tokens']} tokens, vocab {fp['vocab_size']}, fingerprint {fp['sha256'][:12]})"


def num_windows(num_tokens: int, seq_len: int) -> int:
    return (num_tokens - 1) // seq_len


def training_windows(n_windows: int, val_fraction: float) -> int:
    """How many windows train when ``val_fraction`` of them are held out (``data.val_fraction``).

    The held-out windows are the data's tail, one contiguous block: training samples only
    windows ``0 .. n - 1`` (``BatchSampler`` permutes just those), so no held-out window is ever
    trained on, and text near a held-out window is not spread through the training data.
    """
    held_out = 0 if val_fraction <= 0 or n_windows < 1 else max(1, round(n_windows * val_fraction))
    if held_out >= n_windows:
        raise DataError(f"data.val_fraction {val_fraction} holds out all {n_windows} window(s) of the data; "
                        "lower it or give data.val_path")
    return n_windows - held_out


class BatchSampler:
    """Window ids for each micro-batch, a pure function of (seed, step, micro_step, rank).

    Windows are the non-overlapping ``seq_len + 1`` token spans of the data; each epoch visits
    them in a fresh permutation seeded by (seed, epoch). One optimizer step consumes
    ``micro_batch * grad_accum * world_size`` windows, so the data position is the step.
    ``offset`` (``continue_from``) shifts it, for a run resumed by a different number of workers
    than wrote the checkpoint: it continues at the exact window the old run stopped at.
    """

    def __init__(self, *, seed: int, n_windows: int, micro_batch: int, grad_accum: int, world_size: int):
        if n_windows <= 0:
            raise DataError("the data holds no full window")
        self.seed, self.n_windows = seed, n_windows
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.offset = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def consumed(self, steps: int) -> int:
        """The data position after ``steps`` steps: windows taken by all workers together.
        A checkpoint saves it as ``samples_consumed``."""
        return self.offset + steps * self.samples_per_step

    def continue_from(self, step: int, samples_consumed: int) -> None:
        """Continue at ``samples_consumed`` from ``step``, whatever the worker count that got
        there: an elastic run's next step takes the window after the last one taken."""
        self.offset = samples_consumed - step * self.samples_per_step

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        first = self.offset + step * self.samples_per_step + (micro_step * self.world_size + rank) * self.micro_batch
        out = np.empty(self.micro_batch, dtype=np.int64)
        for j, g in enumerate(range(first, first + self.micro_batch)):
            epoch, pos = divmod(g, self.n_windows)
            out[j] = self._permutation(epoch)[pos]
        return out


def get_batch(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, each (B, T) int64, for the given window ids."""
    rows = np.stack([np.asarray(tokens[w * seq_len : w * seq_len + seq_len + 1], dtype=np.int64) for w in windows])
    return rows[:, :-1], rows[:, 1:]
