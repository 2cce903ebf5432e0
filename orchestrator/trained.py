"""A trained model in a run directory: which variant, which checkpoint, its weights, shapes and
tokenizer. What ``export`` writes out and ``generate`` runs; read without a GPU or Ray.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from orchestrator import config as config_mod, preprocess, seeds
from orchestrator.errors import UsageError
from orchestrator.results import CONFIG_FILE, OPTIONS_FILE
from trainer import checkpoint, dataset as dataset_mod, hf_convert
from trainer.model_args import ModelArgs

log = logging.getLogger(__name__)


@dataclass
class Trained:
    run_dir: Path
    variant: str
    checkpoint: Path
    step: int
    args: ModelArgs
    state: dict[str, torch.Tensor]  # our Transformer's state dict, full tensors on CPU
    tokenizer: preprocess.Tokenizer
    data_path: Path


def run_variants(run_dir: Path) -> tuple[config_mod.RunConfig, list[config_mod.VariantConfig]]:
    """The run's saved config and its variants, as ``train`` ran them."""
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: run directory not found")
    cfg = config_mod.load(run_dir / CONFIG_FILE)
    try:
        options = json.loads((run_dir / OPTIONS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{run_dir / OPTIONS_FILE}: unreadable ({e}); is this a run directory made by "
                         "'orchestrator train'?") from None
    variants = config_mod.variant_configs(cfg, bool(options.get("run_both_models")),
                                          bool(options.get("disable_flash_attn")))
    return cfg, seeds.expand(cfg, variants, options.get("seeds", 1))[0]


def choose_checkpoint(storage: Path, step: Optional[int]) -> Path:
    """``checkpoint_<step>`` if given, else the newest that verifies; UsageError if unusable."""
    if step is None:
        skipped: list[str] = []
        found = checkpoint.newest_usable(storage, skipped=skipped)
        if found is None:
            why = ": " + "; ".join(skipped) if skipped else " (the variant never saved one)"
            raise UsageError(f"{storage}: no usable checkpoint{why}")
        return found
    path = storage / f"checkpoint_{step:08d}"
    if not path.is_dir():
        steps = ", ".join(str(int(p.name[11:])) for p in reversed(checkpoint.checkpoint_dirs(storage))) or "none"
        raise UsageError(f"{path}: no checkpoint at step {step} (steps saved: {steps})")
    try:
        checkpoint.verify(path)
    except (checkpoint.CorruptCheckpoint, OSError) as e:
        raise UsageError(f"{path}: not usable ({e})") from None
    return path


def load(run_dir: Path, variant: Optional[str] = None, step: Optional[int] = None) -> Trained:
    """The model of ``variant`` (default: the run's first) at ``step`` (default: the newest
    usable checkpoint). Raises UsageError naming the path and what is wrong."""
    cfg, variants = run_variants(run_dir)
    names = [v.name for v in variants]
    if variant is None:
        vc = variants[0]
        if len(variants) > 1:
            log.info("variant %s (of %s; --variant chooses another)", vc.name, ", ".join(names))
    else:
        vc = next((v for v in variants if v.name == variant), None)
        if vc is None:
            raise UsageError(f"{run_dir}: no variant {variant!r}; the run has {', '.join(names)}")
    ckpt = choose_checkpoint(run_dir / vc.name / checkpoint.STORAGE_NAME, step)
    data_path = Path(cfg.data.path) if cfg.data.path else preprocess.embedded_dataset()
    try:
        tokenizer = preprocess.Tokenizer.of_dataset(dataset_mod.load_dataset(data_path))
    except dataset_mod.DataError as e:
        raise UsageError(f"{e} (the tokenizer of run {run_dir})") from None
    if tokenizer is None:
        raise UsageError(f"{data_path}: the dataset records no tokenizer file")
    state = checkpoint.load_model_state_dict(ckpt)  # the one expensive read, after the cheap checks
    model_cfg, train_cfg = config_mod.resolved_sections(cfg, vc)
    args = model_cfg.args(vocab_size=state["tok_embeddings.weight"].shape[0], max_seq_len=train_cfg.seq_len)
    if args.tie_embeddings:  # a sharded checkpoint may hold the shared tensor once
        state.setdefault("output.weight", state["tok_embeddings.weight"])
    try:
        hf_convert.check_hf_shapes({hf_convert.hf_name(k): tuple(v.shape) for k, v in state.items()}, args)
    except (hf_convert.NotLlama, KeyError) as e:
        raise UsageError(f"{ckpt}: does not match the model in {run_dir / CONFIG_FILE} ({e})") from None
    # A vocab set in the config may be padded past the tokenizer's (to a multiple that suits the
    # GPU); the rows past it are never a token and stay, as in HF checkpoints. A vocab taken from
    # the data is the tokenizer's own: a smaller tokenizer is another one.
    if tokenizer.vocab_size < args.vocab_size and model_cfg.vocab_size is None:
        raise UsageError(f"{data_path}: tokenizer vocab {tokenizer.vocab_size} is smaller than the model's "
                         f"vocab {args.vocab_size} (checkpoint {ckpt}): not the tokenizer the model was trained with")
    return Trained(run_dir=run_dir, variant=vc.name, checkpoint=ckpt, step=int(ckpt.name[11:]), args=args,
                   state=state, tokenizer=tokenizer, data_path=data_path)
