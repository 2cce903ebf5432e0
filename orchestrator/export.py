"""``orchestrator export``: a run's model as a Hugging Face Llama directory that
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load as it is.

Everything is read and checked first, then written into a staging directory next to the
output and moved in at the end, so bad input or a failed write leaves the output untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator import hf_tokenizer, trained
from orchestrator.errors import UsageError
from trainer import checkpoint, finite, hf_checkpoint

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
# What an export writes; with --force these are replaced, anything else in the directory stays.
EXPORT_PATTERNS = ("config.json", "model.safetensors", "model-*-of-*.safetensors", hf_checkpoint.INDEX_FILE,
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", GENERATION_CONFIG)


@dataclass
class Exported:
    output_dir: Path
    variant: str
    step: int
    checkpoint: Path
    files: list[str]
    params: int


def check_output_dir(output_dir: Path, force: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{output_dir}: exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise UsageError(f"{output_dir}: output directory is not empty; choose a new one or pass --force")


def generation_config(eos_id: int) -> dict:
    return {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}


def export(run_dir: Path, output_dir: Path, *, variant: Optional[str] = None, step: Optional[int] = None,
           force: bool = False, max_shard_bytes: int = hf_checkpoint.MAX_SHARD_BYTES) -> Exported:
    check_output_dir(output_dir, force)
    model = trained.load(run_dir, variant, step)
    ruined = finite.non_finite(model.state)
    if ruined:
        raise UsageError(f"{model.checkpoint}: {ruined}; export an earlier checkpoint with --step")
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{output_dir.parent}: cannot create ({e.strerror})") from None
    staging = output_dir.parent / f".{output_dir.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        files = hf_checkpoint.save(staging, model.state, model.args, eos_id=model.tokenizer.eos_id,
                                   max_shard_bytes=max_shard_bytes)
        files += hf_tokenizer.save(model.tokenizer, staging, model_max_length=model.args.max_seq_len)
        (staging / GENERATION_CONFIG).write_text(json.dumps(generation_config(model.tokenizer.eos_id), indent=2) + "\n")
        files.append(GENERATION_CONFIG)
        for f in staging.iterdir():  # safetensors writes owner-only files; an export is for sharing
            f.chmod(0o644)
        _move_in(staging, output_dir)
    except Exception as e:
        if checkpoint.is_disk_full(e):  # safetensors says it as a SafetensorError, not an OSError
            raise UsageError(f"{output_dir}: no space left on device; the export needs about "
                             f"{checkpoint.tensor_bytes(model.state) / 2**20:.1f} MiB") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    params = sum(t.numel() for name, t in model.state.items() if not (name == "output.weight" and model.args.tie_embeddings))
    return Exported(output_dir=output_dir, variant=model.variant, step=model.step, checkpoint=model.checkpoint,
                    files=files, params=params)


def _move_in(staging: Path, output_dir: Path) -> None:
    if not output_dir.exists():
        os.rename(staging, output_dir)
        return
    for pattern in EXPORT_PATTERNS:  # --force: an earlier export's shards must not linger
        for old in output_dir.glob(pattern):
            old.unlink()
    for f in staging.iterdir():
        os.replace(f, output_dir / f.name)
