"""Token datasets: a flat array of token ids (``tokens.bin``) plus a JSON header (``meta.json``).

The header names the tokenizer, vocab size, dtype and token count; it is written last, so a
directory with a header is complete. Batches are a pure function of (seed, step, rank), so a
resumed run sees exactly the batches it would have seen, and two variants with one seed see
the same data in the same order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE, TOKENS_FILE, TOKENIZER_FILE = "meta.json", "tokens.bin", "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"  # a user's SentencePiece model, copied with the data
EMBEDDED_NAME = "embedded-pydoc-v1"
EMBEDDED_VOCAB = 2048


class DataError(ValueError):
    """Bad or missing data; the message names the file and what is wrong."""


# ---------------------------------------------------------------- reading raw text


def read_text_file(path: Path) -> str:
    """A .txt file's text; a file that is not UTF-8 text (a binary named .txt) is refused,
    since tokenising its bytes would fill the dataset with noise."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path}: not a text file (NUL byte at offset {raw.index(0)})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file (invalid byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return text


def iter_documents(path: Path) -> Iterator[str]:
    """Text documents from .txt (one per file), .jsonl ('text' field) or .parquet ('text' column)."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".txt":
        yield read_text_file(path)
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
                yield record["text"]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=["text"])
        except Exception as e:
            raise DataError(f"{path}: cannot read a 'text' column from parquet ({e})") from None
        yield from (t for t in table.column("text").to_pylist() if t)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected .txt, .jsonl or .parquet")


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories contribute their .txt/.jsonl/.parquet files, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".txt", ".jsonl", ".parquet"))
        elif p.exists():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not out:
        raise DataError("no input files (.txt, .jsonl or .parquet) found")
    return out


# ---------------------------------------------------------------- tokenizers


class Tokenizer:
    """A thin wrapper over an HF ``tokenizers`` model or a SentencePiece model."""

    def __init__(self, kind: str, impl, eos_id: int, vocab_size: int):
        self.kind, self.impl, self.eos_id, self.vocab_size = kind, impl, eos_id, vocab_size

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self.impl.encode(text)
        return self.impl.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.impl.decode(ids)

    @classmethod
    def from_file(cls, path: Path) -> "Tokenizer":
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        if path.suffix == ".model":
            try:
                import sentencepiece as spm
            except ImportError:
                raise DataError(f"{path}: SentencePiece model needs 'pip install sentencepiece'") from None
            sp = spm.SentencePieceProcessor(model_file=str(path))
            eos = sp.eos_id() if sp.eos_id() >= 0 else 0
            return cls("sentencepiece", sp, eos, sp.get_piece_size())
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"{path}: not a tokenizers JSON file ({e})") from None
        eos = next((tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>") if tok.token_to_id(t) is not None), 0)
        return cls("tokenizers", tok, eos, tok.get_vocab_size())

    @classmethod
    def train_bpe(cls, texts: list[str], vocab_size: int) -> "Tokenizer":
        """A byte-level BPE trained locally: nothing is downloaded."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls("tokenizers", tok, tok.token_to_id("<|endoftext|>"), tok.get_vocab_size())

    def save(self, directory: Path) -> str | None:
        if self.kind == "tokenizers":
            self.impl.save(str(directory / TOKENIZER_FILE))
            return TOKENIZER_FILE
        (directory / SENTENCEPIECE_FILE).write_bytes(self.impl.serialized_model_proto())
        return SENTENCEPIECE_FILE


# ---------------------------------------------------------------- writing a dataset


def write_dataset(texts: Iterable[str], output_dir: Path, tokenizer: Tokenizer, sources: list[str]) -> dict:
    """Tokenize ``texts`` (EOS between documents) into ``output_dir``; returns the header."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    output_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(output_dir / TOKENS_FILE, "wb") as f:
        for text in texts:
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            n += len(ids)
    if n <= 1:
        raise DataError(f"{output_dir}: the input produced no tokens")
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"kind": tokenizer.kind, "file": tokenizer.save(output_dir), "eos_id": tokenizer.eos_id},
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "num_tokens": n,
        "sources": sources,
    }
    tmp = output_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, output_dir / META_FILE)
    return meta


def preprocess(raw: list[str | Path], output_dir: Path, tokenizer_path: Path | None = None, vocab_size: int = EMBEDDED_VOCAB) -> dict:
    """``orchestrator preprocess``: raw .txt/.jsonl/.parquet files -> a token dataset."""
    files = expand_inputs(raw)
    texts = [t for f in files for t in iter_documents(f)]
    if not any(t.strip() for t in texts):
        raise DataError("the input files hold no text")
    tok = Tokenizer.from_file(tokenizer_path) if tokenizer_path else Tokenizer.train_bpe(texts, vocab_size)
    return write_dataset(texts, output_dir, tok, [str(f) for f in files])


def embedded_texts() -> list[str]:
    """CPython's own documentation topics: text that ships with every Python."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flash-orchestrator"


def embedded_dataset(cache_dir: Path | None = None) -> Path:
    """Build (once) and return the embedded default dataset; safe when runs race to build it."""
    final = (cache_dir or cache_root()) / EMBEDDED_NAME
    if (final / META_FILE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        texts = embedded_texts()
        write_dataset(texts, tmp, Tokenizer.train_bpe(texts, EMBEDDED_VOCAB), ["pydoc_data.topics"])
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (final / META_FILE).is_file():
                raise
        log.info("built the embedded dataset at %s", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- reading a dataset


@dataclass
class TokenDataset:
    path: Path
    meta: dict
    tokens: np.ndarray  # memory-mapped, 1-D

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self) -> Tokenizer | None:
        f = self.meta["tokenizer"].get("file")
        return Tokenizer.from_file(self.path / f) if f else None


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


def num_windows(num_tokens: int, seq_len: int) -> int:
    return (num_tokens - 1) // seq_len


class BatchSampler:
    """Window ids for each micro-batch, a pure function of (seed, step, micro_step, rank).

    Windows are the non-overlapping ``seq_len + 1`` token spans of the data; each epoch visits
    them in a fresh permutation seeded by (seed, epoch). One optimizer step consumes
    ``micro_batch * grad_accum * world_size`` windows, so the data position is the step.
    ``offset`` shifts it, for a run resumed by a different number of workers than wrote the
    checkpoint: it continues at the exact window the old run stopped at.
    """

    def __init__(self, *, seed: int, n_windows: int, micro_batch: int, grad_accum: int, world_size: int,
                 offset: int = 0):
        if n_windows <= 0:
            raise DataError("the data holds no full window")
        self.seed, self.n_windows = seed, n_windows
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.offset = offset
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

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
