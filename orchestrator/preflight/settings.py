"""What the probe checks, derived from the run's config: the attention shape the workers will
run and the flash flag. ``train`` and ``preflight`` both take their settings from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from orchestrator import config as config_mod


@dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    """What the probe checks: the attention shape the workers will run, and the flash flag."""

    head_dim: int = 32
    n_heads: int = 6
    n_kv_heads: int = 2
    dtype: str = "auto"  # as train.dtype: auto = bf16 on GPU, fp32 on CPU
    disable_flash_attn: bool = False
    # The run's real shape, at which the kernels that pass are timed (None: no timing).
    seq_len: Optional[int] = None
    micro_batch_size: int = 1
    n_layers: int = 1  # whether standard attention's scores would fit, should it time fastest
    ffn_hidden: int = 0  # the MLP's width: the kernels are timed in whole blocks (0: the attention block alone)
    activation_checkpointing: int = 0  # train.activation_checkpointing, as the timed blocks recompute
    cudagraphs: bool = False  # train.compile_mode reduce-overhead: the timed blocks replay as CUDA graphs
    compile: str = "auto"  # as train.compile: auto = on GPU
    timeout_s: float = 180.0  # the whole probe on one node
    import_timeout_s: float = 60.0  # one flash-attn import


def settings_for(cfg: config_mod.RunConfig, variants: list[config_mod.VariantConfig], disable_flash_attn: bool,
                 **overrides) -> ProbeSettings:
    """The attention shape the probe checks, and at which it times the kernels that pass: that of
    the first flash variant (else the first)."""
    # Imported here: the probe's child process imports this package, and must not import torch
    # (through the config) before its own guarded check of it.
    from orchestrator import config as config_mod
    from trainer import compile_mode

    variant = next((v for v in variants if v.attention == "flash"), variants[0])
    model, train_cfg = config_mod.resolved_sections(cfg, variant)
    margs = model.args(vocab_size=1, max_seq_len=train_cfg.seq_len,
                       activation_checkpointing=train_cfg.activation_checkpointing)
    return ProbeSettings(head_dim=model.dim // model.n_heads, n_heads=model.n_heads,
                         n_kv_heads=model.n_kv_heads or model.n_heads, dtype=train_cfg.dtype,
                         disable_flash_attn=disable_flash_attn, seq_len=train_cfg.seq_len,
                         micro_batch_size=train_cfg.micro_batch_size, compile=str(train_cfg.compile).lower(),
                         n_layers=model.n_layers, ffn_hidden=margs.ffn_hidden,
                         activation_checkpointing=margs.activation_checkpointing,
                         cudagraphs=compile_mode.uses_cudagraphs(train_cfg.compile_mode), **overrides)
