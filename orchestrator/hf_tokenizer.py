"""Our dataset's tokenizer as ``PreTrainedTokenizerFast`` files (tokenizer.json,
tokenizer_config.json, special_tokens_map.json), which ``AutoTokenizer.from_pretrained`` loads.

A ``tokenizers`` JSON is that format already. A SentencePiece model is converted with
transformers' own converter, following the model's normalizer settings so the result encodes
as ``SentencePieceProcessor.encode`` did when the data was tokenized.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.errors import UsageError
from orchestrator import preprocess

TOKENIZER_JSON = "tokenizer.json"


def _backend(tok: preprocess.Tokenizer):
    """A ``tokenizers.Tokenizer`` equal to ``tok``."""
    if tok.kind == "tokenizers":
        return tok.impl
    try:
        from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

        SpmConverter.build_tokenizer_from_spm_proto  # transformers 5; 4.x converts only known model classes
    except (ImportError, AttributeError):
        raise UsageError("exporting a SentencePiece tokenizer needs transformers 5: pip install -e '.[hf]'") from None
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".model") as f:
        f.write(tok.impl.serialized_model_proto())
        f.flush()
        extractor = SentencePieceExtractor(f.name)
    vocab = extractor.extract(None)["vocab"]
    # legacy=True: a dummy prefix on every chunk, as SentencePiece itself does.
    return SpmConverter.build_tokenizer_from_spm_proto(extractor.proto, vocab, legacy=True)


def save(tok: preprocess.Tokenizer, directory: Path, *, model_max_length: int) -> list[str]:
    """Write the tokenizer files into ``directory``; returns their names."""
    backend = _backend(tok)
    backend.save(str(directory / TOKENIZER_JSON))
    eos = backend.id_to_token(tok.eos_id)
    # No BOS is added: training data is plain text between end-of-text tokens.
    special = {"eos_token": eos, "bos_token": eos, "pad_token": eos}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json"]
