"""Registers torchtitan llama3 flavor ``orchestrator``: exactly the model shape of our YAML.

torchtitan imports this module itself (``--experimental.custom_import bench.torchtitan.flavor``)
at the start of its Trainer, before it looks the flavor up, so this runs in every rank. The YAML
is ``$TITAN_MODEL_CONFIG`` (default ``configs/llama3-8b.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

from torchtitan.models.llama3 import TransformerModelArgs, llama3_args
from torchtitan.models.llama3.model.args import RoPEScalingArgs

from bench.torchtitan import shape

FLAVOR = "orchestrator"
CONFIG_ENV = "TITAN_MODEL_CONFIG"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama3-8b.yaml"


def model_args(path: Path) -> TransformerModelArgs:
    # Scaling factor 1 is plain RoPE, as ours; torchtitan's stock 8B applies Llama-3.1's x8.
    return TransformerModelArgs(**shape.titan_kwargs(shape.model_section(path)),
                                rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0))


llama3_args[FLAVOR] = model_args(Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG))
