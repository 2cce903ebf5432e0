"""A Llama-style decoder, in reading order: norm -> rotary -> attention -> MLP -> block -> model.

Attention is the one swappable piece: the model calls ``self.attn_fn(q, k, v)`` and never
decides which kernel that is (see ``trainer/attention/``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer import loss as loss_mod
from trainer.model_args import ModelArgs, checkpointed

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16 autocast.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, hs/2)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); rotate each (even, odd) pair of channels by its position's angle.
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, attn_fn: AttnFn):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.attn_fn = attn_fn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = self.attn_fn(q, k, v)  # (B, nh, T, hs), causal
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, attn_fn: AttnFn, activation_checkpointing: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, attn_fn)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)
        self.activation_checkpointing = activation_checkpointing  # this block's, from checkpointed()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Activation checkpointing inside the block, as torchtitan orders it (checkpoint, then
        # compile, then shard): the compiled graph holds the recompute, and FSDP's all-gather
        # hooks stay outside the checkpointed region. A checkpoint around the (compiled, sharded)
        # block instead failed on two H200s with "Recomputed values ... have different metadata".
        if self.activation_checkpointing and self.training:
            return checkpoint(self._body, x, cos, sin, use_reentrant=False)
        return self._body(x, cos, sin)

    def _body(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, attn_fn: AttnFn):
        super().__init__()
        rng = torch.get_rng_state()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            Block(args, attn_fn, activation_checkpointing=checkpointed(i, args.activation_checkpointing))
            for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rotary_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # The weights are a function of the RNG state at entry alone (the submodules' own
        # default inits are discarded), so a build on the meta device can replay them with a
        # generator on the target device (trainer/parallelize.py) and get the same model.
        torch.set_rng_state(rng)
        for name, p in self.named_parameters():
            self.draw_init(name, p)

    def init_std(self, name: str, p: torch.Tensor) -> float | None:
        """The init of parameter ``name``: normal with this std, or None for ones (norm gains).
        Drawn in ``named_parameters()`` order (a tied weight once)."""
        if p.dim() < 2:
            return None
        if name.endswith(("wo.weight", "w2.weight")):
            # GPT-2 style scaled init of the residual projections keeps early activations tame.
            return 0.02 / math.sqrt(2 * self.args.n_layers)
        return 0.02

    @torch.no_grad()
    def draw_init(self, name: str, out: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Fill ``out`` (parameter ``name`` or a tensor of its full shape) with its init, drawn
        from ``generator`` (None: torch's default one for ``out``'s device)."""
        std = self.init_std(name, out)
        out.fill_(1.0) if std is None else out.normal_(0.0, std, generator=generator)

    def tie_weights(self) -> None:
        """Share the embedding with the head (``tie_embeddings``); again after ``to_empty``,
        which gives each module its own new tensor."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def compute_buffers(self) -> None:
        """The rotary tables, for real: they are in no checkpoint, and a model built on the meta
        device has none until now (computed on the CPU in float64, then moved)."""
        cos, sin = rotary_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.tok_embeddings(idx)  # (B, T, d)
        for layer in self.layers:
            x = layer(x, cos, sin)  # a checkpointed block checkpoints itself (args.activation_checkpointing)
        h = self.norm(x)
        if targets is None:
            return self.output(h)  # (B, T, vocab)
        # (logits, loss); the fused loss_impls never form the logits and return (None, loss).
        return loss_mod.linear_cross_entropy(self.args.loss_impl, h, self.output, targets)
