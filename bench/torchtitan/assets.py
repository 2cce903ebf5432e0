"""The local tokenizer and text dataset torchtitan reads, so that nothing comes from a hub.

The text is our embedded corpus (CPython's pydoc topics, ``orchestrator.preprocess.embedded_texts``)
and the tokenizer the same byte-level BPE ours trains on it, saved the way torchtitan's
``HuggingFaceTokenizer`` loads a folder: ``tokenizer.json`` plus ``tokenizer_config.json`` naming
BOS and EOS. The dataset is one JSON-lines file with a ``text`` field, the layout of torchtitan's
``c4_test`` loader (``datasets.load_dataset(<dir>, split="train")``). The model's vocabulary is
the YAML's ``model.vocab_size`` (128256 for Llama-3), not the tokenizer's: every id it emits is
below that, as with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.preprocess import EMBEDDED_VOCAB, Tokenizer, embedded_texts

BOS, EOS = "<|begin_of_text|>", "<|endoftext|>"
DATA_FILE = "pydoc.jsonl"


def write_tokenizer(directory: Path, texts: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    Tokenizer.train_bpe(texts, EMBEDDED_VOCAB).impl.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return directory


def write_dataset(directory: Path, texts: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / DATA_FILE).open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return directory


def build(work: Path) -> tuple[Path, Path]:
    """(tokenizer folder, dataset folder) under ``work``, rebuilt each time (a second or two)."""
    texts = embedded_texts()
    return write_tokenizer(work / "tokenizer", texts), write_dataset(work / "data", texts)
