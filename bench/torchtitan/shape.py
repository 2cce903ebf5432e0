"""Our YAML model shape in torchtitan's terms: pure functions, no torchtitan import (tested in CI)."""

from __future__ import annotations

from pathlib import Path

import yaml

# Llama-3-8B's own FFN arguments in torchtitan (its "8B" flavor): 4*dim -> 2/3 -> x1.3 -> up to 1024.
LLAMA3_MULTIPLE_OF, LLAMA3_FFN_MULTIPLIER = 1024, 1.3
REQUIRED = ("dim", "n_layers", "n_heads", "ffn_hidden", "vocab_size")


def titan_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The hidden size torchtitan's llama3 FeedForward builds (models/llama3/model/model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_args(dim: int, ffn_hidden: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make torchtitan build exactly ``ffn_hidden``."""
    if titan_ffn_hidden(dim, LLAMA3_MULTIPLE_OF, LLAMA3_FFN_MULTIPLIER) == ffn_hidden:
        return LLAMA3_MULTIPLE_OF, LLAMA3_FFN_MULTIPLIER
    # Rounding 8/3*dim up to a multiple of ffn_hidden itself gives ffn_hidden when that is larger.
    if titan_ffn_hidden(dim, ffn_hidden, None) == ffn_hidden:
        return ffn_hidden, None
    raise ValueError(f"model.ffn_hidden {ffn_hidden} cannot be built by torchtitan's "
                     f"multiple_of/ffn_dim_multiplier for dim {dim}")


def load(path: Path) -> dict:
    """The whole YAML config (model and train sections), read with plain PyYAML."""
    return yaml.safe_load(Path(path).read_text()) or {}


def model_section(path: Path) -> dict:
    """Our ``model`` section, refused unless torchtitan can build exactly that shape."""
    model = load(path).get("model") or {}
    missing = [k for k in REQUIRED if model.get(k) is None]
    if missing:
        raise ValueError(f"{path}: model.{missing[0]} must be set for the torchtitan comparison "
                         f"(torchtitan takes no shape from our dataset)")
    if model.get("tie_embeddings", True):
        raise ValueError(f"{path}: model.tie_embeddings must be false: torchtitan's llama3 head is untied")
    ffn_args(model["dim"], model["ffn_hidden"])
    return model


def titan_kwargs(model: dict) -> dict:
    """Keyword arguments for torchtitan's ``TransformerModelArgs`` (less the RoPE scaling)."""
    multiple_of, multiplier = ffn_args(model["dim"], model["ffn_hidden"])
    return {
        "dim": model["dim"],
        "n_layers": model["n_layers"],
        "n_heads": model["n_heads"],
        "n_kv_heads": model.get("n_kv_heads") or model["n_heads"],
        "vocab_size": model["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": float(model.get("norm_eps", 1e-5)),
        "rope_theta": float(model.get("rope_theta", 10000.0)),
        # SDPA with a plain causal mask, as our attention (not flex's document masking).
        "attn_type": "sdpa",
        "attn_mask_type": "causal",
    }
