"""torchtitan's ``torchtitan.train`` entry on CPU processes, for the smoke test only.

torchtitan picks its device once at import (``tools/utils.py``:
``_get_available_device_type() or "cuda"``), so on a machine without a GPU it asks for CUDA and
stops at ``torch.cuda.set_device``. Here the detection says "cpu" before torchtitan is imported,
which makes its process group gloo (``Backend.default_device_backend_map["cpu"]``); its
memory monitor, which reads CUDA's allocator, reports zeros; its post-step-1 barrier gets device
index 0 (``torch.cpu.current_device()`` is the string "cpu"); and FSDP2 reduces gradients with a
plain SUM, since torchtitan's divide factor of 1 becomes a PREMUL_SUM, which gloo lacks (NCCL
has it): the same sums either way.
"""

from __future__ import annotations

import torch
import torch._utils

torch._utils._get_available_device_type = lambda: "cpu"

from torchtitan.components import metrics  # noqa: E402  (after the device patch)


class CpuMemoryMonitor(metrics.DeviceMemoryMonitor):
    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.device_name, self.device_index, self.device_capacity = "cpu", 0, 1
        self.device_capacity_gib = 0.0

    def get_peak_stats(self):
        return metrics.DeviceMemStats(*[0] * len(metrics.DeviceMemStats._fields))

    def reset_peak_stats(self):
        pass


metrics.DeviceMemoryMonitor = CpuMemoryMonitor
metrics.build_device_memory_monitor = lambda: CpuMemoryMonitor()

from torchtitan.models.llama3.infra import parallelize  # noqa: E402

_disable_division = parallelize.disable_fsdp_gradient_division


def disable_division_with_sum(model):
    from torch.distributed.fsdp import FSDPModule

    _disable_division(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


parallelize.disable_fsdp_gradient_division = disable_division_with_sum

from torchtitan.distributed import utils as dist_utils  # noqa: E402


class CpuDeviceModule:
    """torch.cpu, with the integer device index that ``barrier(device_ids=...)`` takes."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0


dist_utils.device_module = CpuDeviceModule()

from torchtitan.train import Trainer, main  # noqa: E402

if __name__ == "__main__":
    main(Trainer)
