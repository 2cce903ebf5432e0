"""Our Transformer <-> Hugging Face ``LlamaForCausalLM``: parameter names, tensor layouts and
config fields. Pure functions on dicts and tensors; reading and writing files is elsewhere
(``trainer/hf_checkpoint.py``).

The one layout difference is RoPE. ``trainer.model.apply_rotary`` rotates interleaved channel
pairs (0,1), (2,3), ... of each head (Meta's original layout); HF's ``rotate_half`` pairs
channel i with i + head_dim/2. Permuting the rows of wq and wk per head turns one layout into
the other, exactly as transformers' own ``convert_llama_weights_to_hf.py`` does, so the
attention scores (and hence the logits) are the same.
"""

from __future__ import annotations

import re

import torch

from trainer.model_args import ModelArgs

# Ours -> HF, per layer ({i}) and global. Every tensor of either model is named here.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_OURS = {v: k for k, v in LAYER_NAMES.items()}


class NotLlama(ValueError):
    """An HF config or state dict this model cannot represent; the message says what is wrong."""


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from our interleaved RoPE pairs to HF's rotate_half halves."""
    out, dim_in = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim_in).transpose(1, 2).reshape(out, dim_in)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_half``."""
    out, dim_in = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim_in).transpose(1, 2).reshape(out, dim_in)


def hf_name(name: str) -> str:
    m = _LAYER.match(name)
    if m:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}"
    return GLOBAL_NAMES[name]


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our ``Transformer.state_dict()`` -> ``LlamaForCausalLM`` names and layouts (contiguous
    tensors, ready for safetensors). A tied head is left out: HF ties it from the config."""
    out = {}
    for name, t in state.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name.endswith("attn.wq.weight"):
            t = interleaved_to_half(t, args.n_heads)
        elif name.endswith("attn.wk.weight"):
            t = interleaved_to_half(t, args.n_kv_heads)
        out[hf_name(name)] = t.detach().contiguous()
    return out


def expected_hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a ``LlamaForCausalLM`` of ``args`` holds, with its shape."""
    d, h, f = args.dim, args.head_dim, args.ffn_hidden
    layer = {
        "attn_norm.weight": (d,), "attn.wq.weight": (args.n_heads * h, d),
        "attn.wk.weight": (args.n_kv_heads * h, d), "attn.wv.weight": (args.n_kv_heads * h, d),
        "attn.wo.weight": (d, args.n_heads * h), "mlp_norm.weight": (d,),
        "mlp.w1.weight": (f, d), "mlp.w3.weight": (f, d), "mlp.w2.weight": (d, f),
    }
    shapes = {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,)}
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        shapes.update({hf_name(f"layers.{i}.{k}"): s for k, s in layer.items()})
    return shapes


def check_hf_shapes(shapes: dict[str, tuple[int, ...]], args: ModelArgs) -> None:
    """Raise NotLlama naming the first missing, unexpected or misshapen tensor."""
    expected = expected_hf_shapes(args)
    for name, want in expected.items():
        got = shapes.get(name)
        if got is None:
            raise NotLlama(f"missing tensor {name}")
        if tuple(got) != want:
            raise NotLlama(f"tensor {name} has shape {list(got)}, the config implies {list(want)}")
    # Older transformers saved rotary inv_freq buffers; a tied model may still carry its head.
    extra = [n for n in shapes if n not in expected and not n.endswith("rotary_emb.inv_freq")
             and not (n == "lm_head.weight" and args.tie_embeddings)]
    if extra:
        raise NotLlama(f"unexpected tensor {extra[0]} (a Llama of this config has no such tensor)")


def from_hf_state_dict(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` tensors -> a full state dict in our names and layouts (what
    ``Transformer.load_state_dict`` takes; with a tied head, output.weight is the embedding)."""
    check_hf_shapes({k: tuple(v.shape) for k, v in hf.items()}, args)
    out = {}
    hf_globals = {v: k for k, v in GLOBAL_NAMES.items()}
    for name, t in hf.items():
        m = _HF_LAYER.match(name)
        if m and m[2] in _HF_TO_OURS and int(m[1]) < args.n_layers:
            ours = f"layers.{m[1]}.{_HF_TO_OURS[m[2]]}"
        elif name in hf_globals:
            ours = hf_globals[name]
        else:
            continue  # rotary inv_freq: a buffer older transformers saved; recomputed from rope_theta
        if ours.endswith("attn.wq.weight"):
            t = half_to_interleaved(t, args.n_heads)
        elif ours.endswith("attn.wk.weight"):
            t = half_to_interleaved(t, args.n_kv_heads)
        out[ours] = t
    if args.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ---------------------------------------------------------------- config.json


def hf_config(args: ModelArgs, *, eos_id: int, torch_dtype: str = "float32") -> dict:
    """config.json of the ``LlamaForCausalLM`` equal to ``args``.

    ``rope_theta`` is written both where transformers 4 reads it and as v5's
    ``rope_parameters``, so either version loads the same model.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        # Training documents follow an end-of-text token: it is also the natural start token.
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default":
        raise NotLlama(f"rope type {rope_type!r} is not supported (only plain RoPE)")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def model_fields(cfg: dict) -> dict:
    """The ``ModelConfig`` fields an HF Llama config.json fixes; raises NotLlama."""
    if cfg.get("model_type") != "llama":
        found = f"model_type {cfg['model_type']!r}" if "model_type" in cfg else "no model_type"
        raise NotLlama(f"{found}, expected 'llama'")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if not isinstance(cfg.get(k), int)]
    if missing:
        raise NotLlama(f"config lacks {', '.join(missing)}")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise NotLlama(f"{key} {cfg[key]!r} is not supported (expected {ok!r})")
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    if head_dim * n_heads != cfg["hidden_size"]:
        raise NotLlama(f"head_dim {head_dim} x {n_heads} heads != hidden_size {cfg['hidden_size']} "
                       "(not supported: our heads split hidden_size)")
    return {
        "dim": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": cfg.get("num_key_value_heads") or n_heads,
        "ffn_hidden": cfg["intermediate_size"],
        "vocab_size": cfg["vocab_size"],
        "rope_theta": _rope_theta(cfg),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }
