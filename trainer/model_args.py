"""The model's shape: what ``trainer/model.py`` builds, and what the driver's memory estimate,
the HF conversion and the MFU figures read, without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    activation_checkpointing: int = 0  # checkpoint every Nth block (see checkpointed); 0 none, 1 all
    loss_impl: str = "standard"  # the head + cross-entropy: standard, chunked or liger (trainer/loss.py)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def non_embedding_params(self) -> int:
        """Parameter count without the token embedding (the MFU convention)."""
        d, h = self.dim, self.head_dim
        attn = d * (self.n_heads * h) + 2 * d * (self.n_kv_heads * h) + (self.n_heads * h) * d
        mlp = 3 * d * self.ffn_hidden
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.n_layers * (attn + mlp + 2 * d) + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention scores."""
        return 6 * self.non_embedding_params() + 12 * self.n_layers * self.dim * seq_len


def checkpointed(block: int, every: int) -> bool:
    """Whether block ``block`` (from 0) recomputes its activations in backward when every
    ``every``-th block does (0: none): blocks 0, N, 2N, ..., so N=1 is every block. torchtitan's
    selective layer option (``selective_ac_option`` N) takes as many when N divides the depth,
    counted from the other end (N-1, 2N-1, ...), which includes the last block: backward
    recomputes that one first, with everything else still held, so checkpointing it saves no
    peak memory. Counting from 0 leaves it out whenever N > 1 divides the depth."""
    return every > 0 and block % every == 0

