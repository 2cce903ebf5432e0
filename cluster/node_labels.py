#!/usr/bin/env python3
"""This node's Ray labels, for ``ray start --labels``: accelerator, GLIBC, flash-attn status.

Run on the node itself when Ray starts there (the cluster YAMLs and ``cluster/ray-node.sh``
do), so each label states a fact about that very machine:

    ray start ... --labels="$(python cluster/node_labels.py)"

prints e.g. ``fo-accelerator=NVIDIA-A10G,fo-gpu-count=1,fo-cuda-cc=8.6,fo-glibc=2.35,fo-flash-attn=ok``.

Self-contained on purpose: it runs before anything else of the project is known to work on
the node, so it needs only the standard library. Each fact is found by a small function and
never raises: a fact that cannot be found becomes ``unknown`` rather than a failed
``ray start``. Tasks and Ray Train workers select nodes by these labels, e.g.
``label_selector={"fo-flash-attn": "ok"}``.

Label syntax (Ray 2.60, ``ray._private.label_utils``): keys and values of at most 63
characters, alphanumerics with ``-``, ``_`` and ``.`` inside; pairs joined by commas.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

PREFIX = "fo-"  # keeps our keys apart from Ray's own (ray.io/...) and the user's
ACCELERATOR, GPU_COUNT, CUDA_CC, GLIBC, FLASH_ATTN = (
    PREFIX + k for k in ("accelerator", "gpu-count", "cuda-cc", "glibc", "flash-attn"))
FLASH_OK, FLASH_IMPORT_ONLY, FLASH_MISSING, FLASH_BROKEN = "ok", "import-only", "missing", "broken"
UNKNOWN = "unknown"
PROBE_TIMEOUT_S = 120.0

_VALUE_OK = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def label_value(text: str) -> str:
    """Any text as a valid Ray label value: runs of other characters become '-', at most 63."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text.strip())
    value = value[:63].strip("-_.")
    return value if value and _VALUE_OK.match(value) else UNKNOWN


def format_labels(labels: dict[str, str]) -> str:
    """``key=value,...`` as ``ray start --labels`` parses it."""
    return ",".join(f"{k}={label_value(v)}" for k, v in labels.items())


def glibc_version() -> str:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.35"
    except (ValueError, OSError, AttributeError):
        text = ""
    m = re.search(r"(\d+\.\d+)", text)
    return m.group(1) if m else "none"  # musl, macOS: no GLIBC at all


def gpus_from_nvidia_smi(run=subprocess.run) -> list[tuple[str, str]]:
    """(name, compute capability) per GPU, or [] where there is no NVIDIA GPU or driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                  capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[0]:
            gpus.append((parts[0], parts[1] if len(parts) > 1 else UNKNOWN))
    return gpus


# Exit 0: flash_attn_func ran on the GPU and matched PyTorch's reference attention; 3: not
# installed; 4: imports, but there is no GPU to run it on; anything else (an undefined symbol,
# a GLIBC error, a wrong result, a crash): broken.
_FLASH_CHECK = """
import importlib.util, sys
if importlib.util.find_spec("flash_attn") is None:
    sys.exit(3)
from flash_attn import flash_attn_func
import torch
if not torch.cuda.is_available():
    sys.exit(4)
torch.manual_seed(0)
q, k, v = (torch.randn(1, 33, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))
out = flash_attn_func(q, k, v, causal=True)
ref = torch.nn.functional.scaled_dot_product_attention(
    *(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=True).transpose(1, 2)
sys.exit(0 if (out.float() - ref).abs().max().item() < 2e-2 else 5)
"""


def flash_attn_status(python: str = sys.executable, run=subprocess.run) -> str:
    """Whether flash-attn works in a fresh interpreter on this node: ok, import-only, missing, broken.

    A subprocess, because a broken flash-attn build fails at import with an undefined
    symbol or a GLIBC error, or crashes the interpreter outright; none of that may reach
    ``ray start``. On a GPU node "ok" means a causal forward matched PyTorch's reference.
    """
    try:
        out = run([python, "-c", _FLASH_CHECK], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                  # the label states what the node can do, whatever this shell asked for
                  env={k: v for k, v in os.environ.items() if k != "DISABLE_FLASH_ATTN"})
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return {0: FLASH_OK, 3: FLASH_MISSING, 4: FLASH_IMPORT_ONLY}.get(out.returncode, FLASH_BROKEN)


def node_labels(gpus: list[tuple[str, str]], glibc: str, flash: str) -> dict[str, str]:
    """The labels for one node, from its facts. A node of mixed GPUs is labelled by its first."""
    return {
        ACCELERATOR: gpus[0][0] if gpus else "cpu",
        GPU_COUNT: str(len(gpus)),
        CUDA_CC: gpus[0][1] if gpus else "none",
        GLIBC: glibc,
        FLASH_ATTN: flash,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print a JSON object instead of key=value,...")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter Ray workers use, for the flash-attn check (default: this one)")
    args = p.parse_args(argv)
    labels = node_labels(gpus_from_nvidia_smi(), glibc_version(), flash_attn_status(args.python))
    if args.json:
        print(json.dumps({k: label_value(v) for k, v in labels.items()}))
    else:
        print(format_labels(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
