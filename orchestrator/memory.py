"""How much memory one worker needs: parameters, gradients, optimizer state, activations.

A pure function of the model's shape, the training settings, the strategy (ddp or fsdp), the
world size and the attention, so the driver can refuse a plan that cannot fit before anything
is allocated (``orchestrator/plan.py``), and tests can check it by hand.

What is counted, in bytes, for the model in ``trainer/model.py`` trained by ``trainer/step.py``:
- model state: parameters, gradients and AdamW's two fp32 moments, as the strategy holds them
  (``Strategy.state_bytes``: ``trainer/parallel/ddp.py``, ``fsdp.py``).
- activations saved for backward at the micro-batch and sequence length, per block, counted
  tensor by tensor from the model's forward (see ``_block_bytes_per_token``). The residual
  stream is fp32 under autocast (the embedding and the adds are not autocast ops).
  Standard attention adds its (B, heads, T, T) softmax; the fused kernels keep no T x T matrix.
  Backward needs about one block's worth again for the gradients in flight. Activation
  checkpointing keeps only each checkpointed block's input (every block, or every Nth), plus
  the last block being recomputed when it is one of them.
  Under torch.compile fewer tensors are kept (the rest is recomputed in backward).
- logits: the head's output, held through backward, the fp32 log-softmax and its gradients. A
  fused loss (``train.loss_impl`` chunked or liger) keeps none of these: only the gradients it
  computes in forward (for the hidden states and, in fp32, the head's weight) and one chunk of
  logits in flight. ``auto`` is counted as standard: the worker decides what imports there.
- ``train.param_dtype`` bf16: the residual stream is then bf16, which the activations above
  still count as fp32 (an overestimate).
- the optimizer step's temporaries (AdamW on CPU runs tensor by tensor, with fp32 temporaries
  the size of the largest parameter; the fused CUDA kernel none) and a fixed runtime allowance per process (CUDA
  context and communication buffers on a GPU; the interpreter, torch and Ray on a CPU).

The peak: backward frees a block's activations as it makes that block's gradients, so the two
trade places, and their sum is largest at one end: at the start of backward (all activations,
the logits and, under fsdp, the gathered parameters) or at its end (all gradients, with the
root's reduce-scatter in flight under fsdp, or the optimizer step's temporaries). Under DDP
with several workers the gradients live in DDP's buckets for the whole run, so they add.
docs/performance.md states the accuracy against measured peaks (FSDP: the Llama-3-8B shape on two
H200s, where the end of backward is the peak at micro-batch 1 and the start at 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trainer import parallel
from trainer.config import TrainConfig
from trainer.model_args import ModelArgs, checkpointed
from trainer.parallel import BF16, FP32

GiB = 2**30
# Allowances, not measurements of this model: what a training process holds besides its
# tensors. A CUDA context with cuBLAS workspaces and NCCL's buffers is 0.5-1 GiB; a CPU
# worker process (Python, torch, Ray's worker runtime) about 0.5 GiB of resident memory.
RUNTIME_BYTES = {"cuda": 1 * GiB, "cpu": GiB // 2}
# A fused loss's chunk of logits in flight: trainer/loss.py's chunks hold at most 2**25 fp32
# values, a few copies at once (liger's chunks are of the same order at these shapes).
FUSED_CHUNK_BYTES = 4 * 2**25 * FP32
FUSED_LOSSES = ("chunked", "liger")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker needs at its peak, by part."""

    strategy: str
    world_size: int
    dtype: str  # bf16 or fp32: the compute dtype
    params: int
    grads: int
    optimizer: int
    gathered: int  # fsdp: the unsharded parameters in flight at the start of backward; 0 for ddp
    reduce: int  # fsdp: the root's unsharded gradients and their fp32 copy at the end of backward; 0 for ddp
    activations: int
    logits: int
    step_temp: int  # the optimizer step's temporaries
    runtime: int
    grads_resident: bool  # DDP's buckets: the gradients never leave


    @property
    def model_state(self) -> int:
        """Parameters, gradients and optimizer state: what sharding divides."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        fixed = self.params + self.optimizer + self.runtime
        backward_start = self.gathered + self.activations + self.logits
        if self.grads_resident:
            return fixed + self.grads + max(backward_start, self.step_temp)
        return fixed + max(backward_start, self.grads + max(self.reduce, self.step_temp))

    def describe(self) -> str:
        parts = [("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("gathered", self.gathered), ("reduce", self.reduce), ("activations", self.activations),
                 ("logits", self.logits), ("runtime", self.runtime)]
        inner = " + ".join(f"{name} {gib(v)}" for name, v in parts if v)
        return f"{gib(self.total)} per worker under {self.strategy} x{self.world_size} ({inner})"

    def to_json(self) -> dict:
        return {**asdict(self), "model_state": self.model_state, "total": self.total}


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n < 100 * GiB else f"{n / GiB:,.0f} GiB"


def param_counts(m: ModelArgs) -> tuple[int, int, int]:
    """(all parameters, one block's, the root's: embedding, final norm and an untied head)."""
    d, kv = m.dim, m.n_kv_heads * m.head_dim
    block = d * d + 2 * d * kv + d * d + 3 * d * m.ffn_hidden + 2 * d
    root = m.vocab_size * d + d + (0 if m.tie_embeddings else d * m.vocab_size)
    return m.n_layers * block + root, block, root


def _block_bytes_per_token(m: ModelArgs, e: int, seq_len: int, attention: str, compiled: bool) -> int:
    """Bytes one block saves for backward per token, from its forward in trainer/model.py.

    ``e`` is the compute dtype's size. Eager, under bf16 autocast every linear's input is a
    fresh bf16 copy of an fp32 tensor (``cast``; in fp32 the tensor itself). Compiled, the
    partitioner keeps the fewest tensors and recomputes the cheap ones (norms, rotation, SiLU
    and its product), which the GPU benchmarks' measured peaks bear out (docs/performance.md).
    """
    d, f, kv = m.dim, m.ffn_hidden, m.n_kv_heads * m.head_dim
    inputs = 2 * FP32 * d  # the fp32 residual entering each norm
    attn_in = 3 * e * d  # rotated q, and k, v repeated to every query head
    if compiled:
        total = inputs + 2 * e * d + attn_in + e * d + 2 * e * f  # normed inputs, attention out, w1 and w3 out
        if attention == "standard":
            total += m.n_heads * seq_len * FP32  # the causal softmax
        return total
    cast = e if e != FP32 else 0
    norms = 2 * (2 * FP32 * d)  # each RMSNorm: the normalised and the weighted fp32 tensor
    casts = (3 + 2) * cast * d  # wq, wk, wv and w1, w3 take a bf16 copy each
    rotary = FP32 * (d + kv)  # q and k in fp32 for the rotation
    attn_out = 2 * e * d  # the kernel's output and its (B, T, d) copy for wo
    mlp = 4 * e * f  # w1 out, w3 out, silu out, their product
    total = inputs + norms + casts + rotary + attn_in + attn_out + mlp
    if attention == "standard":
        # The causal softmax, fp32, and its copy in the compute dtype for the matmul with v.
        total += m.n_heads * seq_len * (FP32 + cast)
    return total


def estimate(model: ModelArgs, train: TrainConfig, *, strategy: str, world_size: int, attention: str,
             device: str = "cuda") -> MemoryEstimate:
    """Peak bytes of one worker training ``model`` with ``train`` (see the module docstring).

    ``attention``: 'flash' (a fused kernel, no T x T matrix) or 'standard'; ``device``: 'cuda' or 'cpu'.
    """
    parallelism = parallel.get(strategy)  # ValueError naming the strategies for another name
    e = BF16 if train.precision(device) == "bf16" else FP32
    w = BF16 if parallel.weights_dtype(train.param_dtype, strategy, train.precision(device)) == "bf16" else FP32
    compiled = train.compiles(device)
    n, block, root = param_counts(model)
    state = parallelism.state_bytes(n, block, root, world_size=world_size, weights=w)

    tokens = train.micro_batch_size * train.seq_len
    per_block = _block_bytes_per_token(model, e, train.seq_len, attention, compiled) * tokens
    # Differentiating a block takes about as much again as it saved, for its gradients in flight.
    workspace = per_block
    # A checkpointed block keeps only its fp32 input, the others all they save. Backward
    # recomputes one checkpointed block at a time, and holds the most at the first block it
    # reaches, the last: a recomputed block adds only when that one is checkpointed (any
    # other is recomputed after the blocks above it have freed theirs).
    every = int(train.activation_checkpointing)  # false 0, true 1, N
    n_ckpt = sum(checkpointed(i, every) for i in range(model.n_layers))
    recompute = per_block if checkpointed(model.n_layers - 1, every) else 0
    activations = (n_ckpt * FP32 * model.dim * tokens + (model.n_layers - n_ckpt) * per_block
                   + recompute + workspace)
    # Final norm (as a block's) and, per vocabulary entry: the head's output held through
    # backward, the fp32 log-softmax, and the two fp32 gradients at the start of backward.
    norm = tokens * 2 * 2 * FP32 * model.dim
    if train.loss_impl in FUSED_LOSSES:
        logits = norm + tokens * model.dim * e + model.vocab_size * model.dim * FP32 + FUSED_CHUNK_BYTES
    else:
        logits = norm + tokens * model.vocab_size * (e + 3 * FP32)
    largest = max(model.vocab_size * model.dim, model.dim * model.ffn_hidden)
    step_temp = state.step + (0 if device == "cuda" else 2 * FP32 * largest // state.shard)
    return MemoryEstimate(strategy=strategy, world_size=world_size, dtype="bf16" if e == 2 else "fp32",
                          params=state.params, grads=state.grads, optimizer=state.optimizer, gathered=state.gathered,
                          reduce=state.reduce, activations=activations, logits=logits, step_temp=step_temp,
                          runtime=RUNTIME_BYTES["cuda" if device == "cuda" else "cpu"],
                          grads_resident=state.grads_resident)
