"""FP8 training (``train.float8``) through torchao's float8 linear layers.

torchao's ``convert_to_float8_training`` swaps ``nn.Linear`` for ``Float8Linear``: matmuls in
fp8 with dynamic scaling, weights and optimizer state unchanged. The fp8 tensor cores it needs
exist from compute capability 8.9 (Ada, Hopper) on; anywhere else the option is a usage error,
refused before launch (``refusal``), and again in the worker (``convert``). The driver checks
``refusal`` before Ray starts, so this module imports torch only where a model is converted.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional, get_args

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)
INSTALL = "pip install 'flash-orchestrator[float8]'"
# torchao's recipes (``Float8LinearConfig.from_recipe_name``), train.float8_recipe: tensorwise,
# one dynamic scale per tensor, is the fastest of the three and torchao's default; rowwise and
# rowwise_with_gw_hp scale per row (more accurate, slower matmuls; the latter keeps the weight
# gradient's matmul in high precision). The record names the one that ran.
Float8Recipe = Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]
RECIPES: tuple[str, ...] = get_args(Float8Recipe)
RECIPE = "tensorwise"  # the default


def refusal(use_gpu: bool, capabilities: list[str]) -> Optional[str]:
    """Why ``train.float8: true`` cannot run on these workers (None: it can). ``capabilities``
    are the GPUs' compute capabilities as 'major.minor' (what preflight reports)."""
    need = ".".join(map(str, MIN_CAPABILITY))
    if not use_gpu:
        return (f"train.float8: true needs NVIDIA GPUs of compute capability {need} or newer (Hopper); "
                "these workers run on CPU. Set train.float8: false")
    old = sorted({c for c in capabilities if tuple(int(x) for x in c.split(".")) < MIN_CAPABILITY})
    if old:
        return (f"train.float8: true needs GPUs of compute capability {need} or newer (Hopper); "
                f"found {', '.join(old)}. Set train.float8: false")
    return None


def keep_in_high_precision(module: torch.nn.Module, fqn: str) -> bool:
    """The Linear layers left alone: the output head (its logits feed the loss directly, and
    torchao's recipes keep it), and any whose dims fp8 matmuls cannot take (multiples of 16)."""
    import torch

    if fqn == "output" or fqn.endswith(".output"):
        return True
    if isinstance(module, torch.nn.Linear):
        return module.in_features % 16 != 0 or module.out_features % 16 != 0
    return False


def convert(model: torch.nn.Module, device: torch.device, recipe: str = RECIPE) -> torch.nn.Module:
    """Swap the model's Linear layers (in place) for torchao's Float8Linear, scaled by ``recipe``."""
    import torch

    capabilities = []
    if device.type == "cuda":
        capabilities = [".".join(map(str, torch.cuda.get_device_capability(device)))]
    problem = refusal(device.type == "cuda", capabilities)
    if problem:
        raise ValueError(problem)
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise ValueError(f"train.float8: true needs torchao ({INSTALL}): {e}") from None
    convert_to_float8_training(model, config=float8_config(recipe),
                               module_filter_fn=lambda m, fqn: not keep_in_high_precision(m, fqn))
    n = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    log.info("float8 training: %d Linear layers converted (recipe %s; the output head stays bf16)", n, recipe)
    return model


def float8_config(recipe: str = RECIPE):
    """torchao's Float8LinearConfig of ``recipe`` (one of RECIPES)."""
    from torchao.float8 import Float8LinearConfig

    if recipe not in RECIPES:
        raise ValueError(f"train.float8_recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    return Float8LinearConfig.from_recipe_name(recipe)
