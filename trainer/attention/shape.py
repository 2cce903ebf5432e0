"""The attention shape: what a kernel is checked and timed at, and what its choice is cached
under. One frozen value, made from the run's config on the driver and in the worker alike, and
handed to the probe child as one JSON argument. Settings are kept as configured (``auto``);
each device resolves them the one way the training step does. Imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

from trainer import compile_mode, config


@dataclass(frozen=True, kw_only=True)
class AttentionShape:
    head_dim: int = 32
    n_heads: int = 6
    n_kv_heads: int = 2
    dtype: str = "auto"  # as train.dtype: auto = bf16 on GPU, fp32 on CPU
    # The run's real shape, at which the kernels that pass are timed (None: no timing).
    seq_len: Optional[int] = None
    micro_batch: int = 1
    n_layers: int = 1  # how many blocks hold attention scores, should standard attention win
    # The MLP's width: when set, the kernels are timed in whole transformer blocks (norms,
    # attention, SwiGLU MLP, residuals), stacked as the model stacks them; 0 times the attention
    # block alone (projections, rotary, attention, output projection).
    ffn_hidden: int = 0
    activation_checkpointing: int = 0  # train.activation_checkpointing: every Nth block recomputes
    compile: str = "auto"  # as train.compile: auto = on GPU
    # train.compile_mode replays CUDA graphs (the setting): the timed blocks replay so too where a
    # compiled model does (a GPU), for a step whose launches cost no CPU time ranks kernels otherwise.
    cudagraphs: bool = False

    @classmethod
    def of_run(cls, tc, margs) -> "AttentionShape":
        """The shape of a run (``tc``: its TrainConfig, ``margs``: its ModelArgs)."""
        # train.micro_batch_size auto is resolved by the plan, after preflight has timed the
        # kernels: they are timed at micro-batch 1 then, and the worker times again at its own.
        micro_batch = 1 if tc.micro_batch_size == "auto" else tc.micro_batch_size
        return cls(head_dim=margs.head_dim, n_heads=margs.n_heads, n_kv_heads=margs.n_kv_heads, dtype=tc.dtype,
                   seq_len=tc.seq_len, micro_batch=micro_batch, n_layers=margs.n_layers,
                   ffn_hidden=margs.ffn_hidden, activation_checkpointing=margs.activation_checkpointing,
                   compile=str(tc.compile).lower(), cudagraphs=compile_mode.uses_cudagraphs(tc.compile_mode))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AttentionShape":
        return cls(**json.loads(text))

    # ------------------------------------------------ as a device runs it

    def precision(self, device_type: str) -> str:
        return config.precision(self.dtype, device_type)

    def compiles(self, device_type: str) -> bool:
        return config.compiles({"true": True, "false": False}.get(self.compile, self.compile), device_type)

    def replays(self, device_type: str) -> bool:
        """Whether the timed blocks replay as CUDA graphs, as the compiled model does here."""
        return compile_mode.replays(compile_mode.CUDA_GRAPHS if self.cudagraphs else "default",
                                    compiled=self.compiles(device_type), device_type=device_type)

    def as_run(self, device_type: str) -> dict:
        """What the kernels were timed at on ``device_type``: the record's ``shape``."""
        return dict(asdict(self), dtype=self.precision(device_type), compile=self.compiles(device_type),
                    cudagraphs=self.replays(device_type))
