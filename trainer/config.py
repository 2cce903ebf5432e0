"""Typed model and training settings, validated once (pydantic: typed validation whose errors
carry the exact key path, so a bad value is reported as ``train.lr`` rather than a traceback).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.float8 import Float8Recipe
from trainer.model_args import ModelArgs

# The attentions a variant can ask for; trainer/attention/ resolves each to a kernel.
AttentionName = Literal["flash", "standard"]
ATTENTIONS: tuple[str, ...] = get_args(AttentionName)
# The output head + cross-entropy (train.loss_impl; trainer/loss.py computes each).
LossImpl = Literal["standard", "chunked", "liger"]
# A setting the run resolves on its machine: the plan (micro_batch_size), the worker (loss_impl).
Auto = Literal["auto"]


def precision(dtype: str, device_type: str) -> Literal["bf16", "fp32"]:
    """A ``train.dtype`` on a ``device_type`` ('cuda' or 'cpu') device: bf16 autocast on GPU (or
    when asked), fp32 otherwise. The preflight probe applies the same rule to the run's settings."""
    return "bf16" if dtype == "bf16" or (dtype == "auto" and device_type == "cuda") else "fp32"


def param_dtype_refusal(param_dtype: str, precision: str) -> Optional[str]:
    """Why ``train.param_dtype`` cannot run at compute ``precision`` (None: it can); a CPU
    variant under train.dtype auto computes in fp32, which only the plan knows."""
    if param_dtype == "bf16" and precision != "bf16":
        return ("train.param_dtype bf16 needs bf16 compute, and this variant computes in fp32: set train.dtype "
                "bf16 (auto is fp32 on a CPU), or train.param_dtype auto")
    return None


def compiles(compile: Union[bool, str], device_type: str) -> bool:
    """A ``train.compile`` (true, false or 'auto') on a ``device_type`` device: auto is on for GPU."""
    return compile is True or (compile == "auto" and device_type == "cuda")


class Strict(BaseModel):
    # Unknown keys are errors, and every value is taken only as its own type (pydantic's strict
    # mode; an int may stand for a float, YAML's 1 for 1.0): `use_gpu: 'yes'`, `max_steps: true`
    # or `compile: "off"` is an error naming the key, not a guess.
    # YAML's .inf and .nan are errors too: an infinite lr or weight decay turns the weights to NaN.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Strict):
    dim: int = Field(192, gt=0, description="hidden size")
    n_layers: int = Field(4, gt=0, description="transformer blocks")
    n_heads: int = Field(6, gt=0, description="query heads")
    n_kv_heads: Optional[int] = Field(2, gt=0, description="key/value heads (GQA); null = n_heads")
    ffn_hidden: Optional[int] = Field(None, gt=0, description="SwiGLU hidden size; null = 8/3*dim rounded to 64")
    vocab_size: Optional[int] = Field(None, gt=0, description="null = the dataset's vocab size")
    rope_theta: float = Field(10000.0, gt=0, description="the rotary embedding's base")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm's epsilon")
    tie_embeddings: bool = Field(True, description="share the token embedding with the output head")
    init_from: Optional[str] = Field(None, description="a Hugging Face Llama directory to start from, local or "
                                     "a URI (s3://, gs://, ...) each node fetches; the shapes above come from its "
                                     "config.json (leave them unset)")

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({kv})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim dim/n_heads ({self.dim // self.n_heads}) must be even for rotary embeddings")
        return self

    def args(self, *, vocab_size: int, max_seq_len: int, activation_checkpointing: bool | int = False,
             loss_impl: str = "standard") -> ModelArgs:
        """``activation_checkpointing``: train.activation_checkpointing (false, true or N)."""
        ffn = self.ffn_hidden or 64 * ((int(8 * self.dim / 3) + 63) // 64)
        return ModelArgs(
            vocab_size=self.vocab_size or vocab_size,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads or self.n_heads,
            ffn_hidden=ffn,
            max_seq_len=max_seq_len,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            tie_embeddings=self.tie_embeddings,
            activation_checkpointing=int(activation_checkpointing),  # false 0, true 1, N
            loss_impl=loss_impl,
        )


class FaultConfig(Strict):
    """Test hook: ``kill`` SIGKILLs the worker of ``rank`` when it reaches ``step``, once;
    ``enospc`` makes that rank's checkpoint write at ``step`` fail as a full disk would, once;
    ``slow`` makes that rank's every step from ``step`` on take ``slow_s`` longer: a straggler,
    or with rank null every rank alike (even ranks whose steps outlast a shared CPU's noise)."""

    rank: Optional[int] = Field(0, ge=0, description="the worker rank the fault hits (slow: null for every rank)")
    step: int = Field(..., gt=0, description="the step at which it hits (slow: from which on)")
    kind: Literal["kill", "enospc", "slow"] = Field("kill", description="kill: SIGKILL the worker; enospc: its "
                                                              "checkpoint write fails as a full disk would; slow: "
                                                              "it sleeps in each step's compute")
    slow_s: float = Field(0.05, gt=0, description="slow: seconds the rank sleeps in each step")

    @model_validator(mode="after")
    def _one_rank_unless_slow(self):
        if self.rank is None and self.kind != "slow":
            raise ValueError(f"fault.rank null (every rank) is only for kind slow, not {self.kind}")
        return self


class TrainConfig(Strict):
    seq_len: int = Field(128, gt=1, description="tokens per sequence")
    micro_batch_size: Union[Auto, Annotated[int, Field(gt=0)]] = Field(
        8, description="sequences per worker per micro-step; auto: the largest whose estimated peak memory fits "
                       "scaling.memory_headroom of the worker's device, up to 12 x 4096 tokens (the plan says "
                       "which and why; docs/performance.md)")
    grad_accum_steps: int = Field(1, gt=0, description="micro-steps per optimizer step")
    max_steps: int = Field(100, gt=0, description="optimizer steps to train (--max-steps overrides)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-4, ge=0, description="floor of the cosine decay")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps before the cosine decay")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW's second-moment decay")
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    seed: int = Field(1337, ge=0, description="weights and batches are functions of it (--seed overrides)")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints (and at the end, see checkpoint_at_end)")
    checkpoint_at_end: bool = Field(True, description="also save at the last step when it is not a multiple of "
                                          "checkpoint_every; false for benchmark runs of large models, whose final "
                                          "checkpoint (16 bytes per parameter: ~128 GB for 8B) costs minutes and disk")
    checkpoint_async: bool = Field(True, description="training stops for a checkpoint only to copy the state "
                                         "into CPU memory; its files are written (and, with the run directory in a "
                                         "bucket, uploaded: Ray Train's ASYNC upload) while training goes on, and "
                                         "the next checkpoint waits for them; false writes (and uploads) while "
                                         "training waits. Each checkpoint's blocking time is in the summary "
                                         "(checkpoint_block_s)")
    log_every: int = Field(1, gt=0, description="steps between logged steps (metrics.jsonl, TensorBoard, the "
                                                 "progress lines)")
    eval_every: int = Field(100, ge=0, description="steps between held-out evaluations, and one at the last step; "
                            "0 = off (trainer/evaluate.py; docs/validation.md)")
    eval_batches: int = Field(8, gt=0, description="held-out batches of micro_batch_size sequences per evaluation: "
                              "the same ones every time, for every variant and worker count")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    param_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the weights' dtype in forward and backward (trainer/master_weights.py): fp32 (autocast "
                            "casts them), or bf16 (needs bf16 compute: gradients, and DDP's all-reduce, in bf16; "
                            "AdamW steps fp32 master copies, which checkpoints keep); auto: bf16 under fsdp when "
                            "computing in bf16 (FSDP2's mixed precision), else fp32")
    compile: Union[Literal["auto"], bool] = Field("auto", description="torch.compile; auto: on for GPU")
    activation_checkpointing: Union[bool, int] = Field(
        False, description="recompute blocks in backward instead of keeping their activations: true every block; "
                           "an integer N every Nth block (blocks 0, N, 2N, ..., as many as torchtitan's selective "
                           "layer option N; 1 is true): fewer recomputes for more memory; false none")
    float8: bool = Field(False, description="fp8 matmuls via torchao (GPUs of compute capability 8.9+; "
                                                  "pip install 'flash-orchestrator[float8]')")
    float8_recipe: Float8Recipe = Field(
        "tensorwise", description="torchao's float8 scaling, with train.float8: tensorwise (one scale per tensor, "
                                  "fastest), rowwise or rowwise_with_gw_hp (per row: more accurate, slower)")
    loss_impl: Union[Auto, LossImpl] = Field(
        "standard", description="the output head + cross-entropy: standard (full logits), chunked (plain PyTorch, "
                                "chunk by chunk, no full logits kept) or liger (liger-kernel's fused kernel; CUDA, "
                                "pip install liger-kernel); auto: liger where it imports on the worker's GPU, else "
                                "standard (the record says which ran and why)")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = Field(
        "default", description="Inductor's mode for the compiled model (with train.compile): default and "
                               "max-autotune-no-cudagraphs (which times matmul and kernel configs at the first "
                               "compile) compile each block; reduce-overhead compiles the whole model as one graph "
                               "replayed as CUDA graphs, for small models whose steps wait on the CPU (GPU; not "
                               "with scaling.strategy fsdp)")
    fault: Optional[FaultConfig] = Field(None, description="test hook: kill one rank at one step, fail its checkpoint "
                                           "write, or slow it down")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _every_nth_block(cls, v):
        # Checked before pydantic's own coercion, which would read false as 0 (and "2" or 2.0 as 2).
        # bool first: True == 1 in Python, so true and 1 are one setting, stored as true.
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v >= 1:
            return True if v == 1 else v
        raise ValueError("Input should be false, true or a whole number N >= 1 (checkpoint every Nth block)")

    @property
    def tokens_per_step(self) -> int:
        """The tokens one worker trains on per optimizer step."""
        return self.micro_batch_size * self.grad_accum_steps * self.seq_len

    def precision(self, device_type: str) -> Literal["bf16", "fp32"]:
        """The compute precision on a ``device_type`` ('cuda' or 'cpu') device (``precision``)."""
        return precision(self.dtype, device_type)

    def param_dtype_refusal(self, device_type: str) -> Optional[str]:
        """Why ``param_dtype`` cannot run on a ``device_type`` device (``param_dtype_refusal``):
        what the plan, the worker and the bench each check."""
        return param_dtype_refusal(self.param_dtype, self.precision(device_type))

    def compiles(self, device_type: str) -> bool:
        """Whether training runs under torch.compile on a ``device_type`` device (``compiles``)."""
        return compiles(self.compile, device_type)

    @model_validator(mode="after")
    def _schedule(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.float8_recipe != "tensorwise" and not self.float8:
            # Else the run would train in bf16 while the config reads as fp8.
            raise ValueError(f"float8_recipe ({self.float8_recipe}) applies only with float8: true")
        if self.param_dtype == "bf16" and self.dtype == "fp32":
            raise ValueError("param_dtype bf16 needs bf16 compute; train.dtype is fp32")
        if self.param_dtype == "bf16" and self.float8:
            raise ValueError("param_dtype bf16 with float8: true is not supported (float8 keeps its weights in "
                             "high precision); leave param_dtype auto")
        return self
