"""What the driver hands every worker of one variant: validated on both sides of Ray, and
importable without torch (the driver builds it before its torch import is done)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, field_validator

from trainer import parallel
from trainer.config import ModelConfig, TrainConfig


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str
    model: ModelConfig
    train: TrainConfig
    data_path: str
    val_fraction: float = 0.0  # the tail of data_path held out for evaluation (data.val_fraction)
    val_path: Optional[str] = None  # held-out data of its own (data.val_path), in place of val_fraction
    out_dir: str  # the variant's directory in the run directory: metrics, TensorBoard
    strategy: parallel.Name = parallel.DEFAULT  # how the model is spread over the workers (trainer/parallel/)
    storage_uri: Optional[str] = None  # the variant's directory in a bucket, when the run directory is one
    auto: dict[str, str] = {}  # the settings the plan resolved from auto: key -> "value (why)"

    @field_validator("train")
    @classmethod
    def _micro_batch_resolved(cls, train: TrainConfig) -> TrainConfig:
        if train.micro_batch_size == "auto":  # the plan resolves it from the workers' memory (orchestrator/plan.py)
            raise ValueError("train.micro_batch_size auto reaches a worker unresolved; the plan gives it a number")
        return train
