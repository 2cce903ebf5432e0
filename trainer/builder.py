"""The training setup, built once: what a run resolves on its device (``Settings``), then the
model (on the meta device, spread by its strategy, float8, compiled), the optimizer (on fp32
masters where the weights are bf16) and the step (``Trainer``). The Ray worker loop
(``trainer/loop.py``) and ``bench`` (``bench/training.py``) both build through
here, so the bench times what training runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from trainer import attention, compile_mode, loss, master_weights, parallel, parallelize
from trainer.config import ModelConfig, TrainConfig
from trainer.model import AttnFn, ModelArgs, Transformer
from trainer.optim import optimizer_for
from trainer.step import Stepper, training_dtype


@dataclass(frozen=True)
class Settings:
    """A variant's training settings resolved for one device and worker count."""

    model: ModelArgs
    train: TrainConfig
    strategy: str  # a name in trainer.parallel.STRATEGIES
    device: torch.device
    world_size: int
    dtype: torch.dtype  # autocast's (train.dtype)
    compiled: bool  # train.compile
    cudagraphs: bool  # the compiled model replays as CUDA graphs (train.compile_mode)
    param_dtype: str  # the weights' dtype in forward and backward (train.param_dtype, resolved)
    auto: dict[str, str]  # the settings resolved here from auto: key -> "value (why)"

    @property
    def refusal(self) -> Optional[str]:
        """Why these settings cannot train (None: they can); the plan refuses each first (orchestrator/run.py)."""
        return (self.train.param_dtype_refusal(self.device.type)
                or parallel.get(self.strategy).refusal(self.train, cudagraphs=self.cudagraphs))

    @property
    def compile_scope(self) -> Optional[str]:
        return compile_mode.scope(self.train.compile_mode, self.strategy, compiled=self.compiled)

    @property
    def tokens_per_step(self) -> int:
        """The tokens all workers together train on per optimizer step."""
        return self.train.tokens_per_step * self.world_size

    @property
    def flops_per_token(self) -> float:
        return self.model.flops_per_token(self.train.seq_len)

    @property
    def attention_shape(self) -> attention.AttentionShape:
        """The shape the attention kernels are checked and timed at, and their choice cached under: this run's."""
        return attention.AttentionShape.of_run(self.train, self.model)


def settings(model: ModelConfig, train: TrainConfig, *, strategy: str, vocab_size: int, device: torch.device,
             world_size: int = 1) -> Settings:
    """``model`` and ``train`` on ``device``, for data of ``vocab_size`` tokens; ``train.loss_impl``
    auto becomes the one that runs here (``loss.resolve``)."""
    impl, why = loss.resolve(train.loss_impl, device)
    train = train.model_copy(update={"loss_impl": impl})
    compiled = train.compiles(device.type)
    return Settings(model=model.args(vocab_size=vocab_size, max_seq_len=train.seq_len,
                                     activation_checkpointing=train.activation_checkpointing,
                                     loss_impl=train.loss_impl),
                    train=train, strategy=strategy, device=device, world_size=world_size,
                    dtype=training_dtype(train, device), compiled=compiled,
                    cudagraphs=compile_mode.replays(train.compile_mode, compiled=compiled, device_type=device.type),
                    param_dtype=parallel.weights_dtype(train.param_dtype, strategy, train.precision(device.type)),
                    auto={"train.loss_impl": f"{impl} ({why})"} if why else {})


def build_model(s: Settings, *, init_weights: Optional[Callable[[], dict]] = None) -> tuple[nn.Module, Transformer]:
    """(the model to train, the plain Transformer inside it), with no attention kernel yet
    (``attention.unresolved``: ``trainer`` sets the one chosen, which may be chosen meanwhile)."""
    tc = s.train
    return parallel.get(s.strategy).build(s.model, attention.unresolved, device=s.device, seed=tc.seed,
                                          compile=s.compiled, world_size=s.world_size, init_weights=init_weights,
                                          float8=tc.float8_recipe if tc.float8 else None,
                                          whole_graph=compile_mode.whole_model(tc.compile_mode, s.strategy),
                                          param_dtype=master_weights.torch_dtype(s.param_dtype))


@dataclass
class Trainer:
    """What trains: the model (wrapped by its strategy), the Transformer inside it, the optimizer
    and one step over a list of micro-batches (``Stepper``)."""

    model: nn.Module
    raw_model: Transformer
    optimizer: torch.optim.Optimizer
    step: Stepper


def trainer(s: Settings, model: nn.Module, raw_model: Transformer, attn_fn: AttnFn) -> Trainer:
    """The built model with its attention kernel set (before its first forward, where the
    compiled blocks trace it), an optimizer and its step."""
    parallelize.set_attention(raw_model, attn_fn)
    optimizer = optimizer_for(raw_model, s.train, s.device)  # on fp32 masters where the weights are bf16
    model.train()
    tc = s.train
    return Trainer(model, raw_model, optimizer,
                   Stepper(model, optimizer, device=s.device, dtype=s.dtype, grad_accum=tc.grad_accum_steps,
                           grad_clip=tc.grad_clip, compiled=s.compiled, cudagraphs=s.cudagraphs,
                           no_sync=parallel.get(s.strategy).no_sync))


def check(s: Settings) -> None:
    """Raise ValueError when ``s`` cannot train: train.loss_impl (liger on a CPU, or not installed), a refusal."""
    loss.check(s.train.loss_impl, s.device)
    if s.refusal:
        raise ValueError(s.refusal)
