"""Driver-side preprocessing: raw text (.txt, .jsonl, .parquet) -> tokenizer -> a token dataset
in the format ``trainer/dataset.py`` reads, and the embedded default corpus built once per node.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from trainer import atomic_write, user_cache
from trainer.dataset import (FORMAT_VERSION, META_FILE, SENTENCEPIECE_FILE, TOKENIZER_FILE, TOKENS_FILE, DataError,
                             TokenDataset)

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded-pydoc-v1"
EMBEDDED_VOCAB = 2048


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
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: .parquet input needs pyarrow: pip install 'flash-orchestrator[parquet]'") from None

        try:
            schema = pq.read_schema(path)
            if "text" not in schema.names:
                raise DataError(f"{path}: no 'text' column (its columns: {', '.join(schema.names) or 'none'})")
            kind = schema.field("text").type
            if kind not in (pa.string(), pa.large_string()):
                raise DataError(f"{path}: the 'text' column holds {kind}, expected strings")
            table = pq.read_table(path, columns=["text"])
        except pa.ArrowException as e:  # its messages run over several lines: the first says it
            raise DataError(f"{path}: cannot read a 'text' column from parquet ({str(e).splitlines()[0]})") from None
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
    def of_dataset(cls, ds: TokenDataset) -> "Tokenizer | None":
        """The tokenizer a dataset was written with, if it was copied beside it."""
        f = ds.meta["tokenizer"].get("file")
        return cls.from_file(ds.path / f) if f else None

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
    atomic_write.write_json(output_dir / META_FILE, meta)
    return meta


def preprocess(raw: list[str | Path], output_dir: Path, tokenizer_path: Path | None = None, vocab_size: int = EMBEDDED_VOCAB) -> dict:
    """``orchestrator preprocess``: raw .txt/.jsonl/.parquet files -> a token dataset."""
    files = expand_inputs(raw)
    texts = [t for f in files for t in iter_documents(f)]
    if not any(t.strip() for t in texts):
        raise DataError("the input files hold no text")
    tok = Tokenizer.from_file(tokenizer_path) if tokenizer_path else Tokenizer.train_bpe(texts, vocab_size)
    try:
        return _built_in_place(output_dir, lambda tmp: write_dataset(texts, tmp, tok, [str(f) for f in files]))
    except OSError as e:  # a full disk, above all
        raise DataError(f"{output_dir}: cannot write the dataset ({e.strerror or e})") from None


def _built_in_place(final: Path, build: Callable[[Path], dict]) -> dict:
    """``build`` a dataset in a new directory beside ``final``, then rename it to ``final`` (new
    or empty): a build cut short (Ctrl-C, a full disk) leaves no partial dataset behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        meta = build(tmp)
        os.rename(tmp, final)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_texts() -> list[str]:
    """CPython's own documentation topics: text that ships with every Python."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def embedded_dataset(cache_dir: Path | None = None) -> Path:
    """Build (once) and return the embedded default dataset; safe when runs race to build it."""
    final = (cache_dir or user_cache.root()) / EMBEDDED_NAME
    if (final / META_FILE).is_file():
        return final
    texts = embedded_texts()
    try:
        _built_in_place(final, lambda tmp: write_dataset(texts, tmp, Tokenizer.train_bpe(texts, EMBEDDED_VOCAB),
                                                         ["pydoc_data.topics"]))
        log.info("built the embedded dataset at %s", final)
    except OSError:  # another process finished first; theirs is as good as ours
        if not (final / META_FILE).is_file():
            raise
    return final
