"""What the probe checks, derived from the run's config: the attention shape the workers will
run and the flash flag. ``train`` and ``preflight`` both take their settings from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trainer.attention.shape import AttentionShape

if TYPE_CHECKING:
    from orchestrator import config as config_mod


@dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    shape: AttentionShape = field(default_factory=AttentionShape)
    disable_flash_attn: bool = False
    timeout_s: float = 180.0  # the whole probe on one node
    import_timeout_s: float = 60.0  # one flash-attn import


def settings_for(cfg: config_mod.RunConfig, variants: list[config_mod.VariantConfig], disable_flash_attn: bool,
                 **overrides) -> ProbeSettings:
    """The attention shape the probe checks, and at which it times the kernels that pass: that of
    the first flash variant (else the first)."""
    # Imported here: the probe's child process imports this package, and must not import torch
    # (through the config) before its own guarded check of it.
    from orchestrator import config as config_mod

    variant = next((v for v in variants if v.attention == "flash"), variants[0])
    model, train_cfg = config_mod.resolved_sections(cfg, variant)
    margs = model.args(vocab_size=1, max_seq_len=train_cfg.seq_len,
                       activation_checkpointing=train_cfg.activation_checkpointing)
    return ProbeSettings(shape=AttentionShape.of_run(train_cfg, margs), disable_flash_attn=disable_flash_attn,
                         **overrides)
