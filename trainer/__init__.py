"""The model and the per-worker training loop; importable and testable without Ray.

Importing this package is the first thing our code does in a Ray Train worker, so the
flash-attn import guard goes in here: with DISABLE_FLASH_ATTN=1 in the worker's environment
(set by the driver before the process starts) no later import can pull flash-attn in.
"""

from trainer.attention import guard

if guard.disabled_by_env():
    guard.install()
