"""Fake flash-attn installs for preflight tests: a package whose import fails the way real broken
wheels fail, with dist-info so importlib.metadata sees it, and optionally a real ELF .so patched
to need a GLIBC no machine has."""

from __future__ import annotations

from pathlib import Path

import torch

# Real error texts, as users reported them (paths shortened).
SO = "/usr/local/lib/python3.10/site-packages/flash_attn_2_cuda.cpython-310-x86_64-linux-gnu.so"
IMPORT_ERRORS = {
    "glibc_too_old": f"ImportError: /lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.32' not found (required by {SO})",
    "libstdcxx_too_old": f"ImportError: /lib/x86_64-linux-gnu/libstdc++.so.6: version `GLIBCXX_3.4.29' not found "
                         f"(required by {SO})",
    "torch_abi_mismatch": f"ImportError: {SO}: undefined symbol: "
                          "_ZN3c105ErrorC2ENS_14SourceLocationENSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE",
    "cuda_runtime_mismatch": "ImportError: libcudart.so.12: cannot open shared object file: No such file or directory",
    # flash-attn-4 installed without its CUDA toolkit libraries (seen on an H100, 2026-12-07)
    "cutlass_dsl_no_toolkit": "RuntimeError: No CTK flavor installed: expected one or more of /site/nvidia_cutlass_dsl/"
                              "dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu{N}.cpython-...so . Try `pip install "
                              "nvidia-cutlass-dsl` (cu12 default) or `pip install 'nvidia-cutlass-dsl[cu13]'`.",
    "driver_too_old": "RuntimeError: CUDA driver version is insufficient for CUDA runtime version",
}
RUN_ERRORS = {
    "gpu_too_old": "RuntimeError: FlashAttention only supports Ampere GPUs or newer.",
    "arch_not_in_build": "RuntimeError: CUDA error: no kernel image is available for execution on the device\n"
                         "CUDA kernel errors might be asynchronously reported at some other API call",
    "driver_too_old": "RuntimeError: The NVIDIA driver on your system is too old (found version 11040). Please update "
                      "your GPU driver by downloading and installing a new version from the URL",
    "head_dim_unsupported": "RuntimeError: FlashAttention forward only supports head dimension at most 256",
    "dtype_unsupported": "RuntimeError: FlashAttention only support fp16 and bf16 data type",
    "not_installed": "ModuleNotFoundError: No module named 'flash_attn'",
    "sdpa_kernel_unavailable": "RuntimeError: No available kernel. Aborting execution.",
}


def import_failing(exc_text: str) -> str:
    """Module source that fails on import with ``exc_text`` ('ImportError: ...')."""
    exc, _, msg = exc_text.partition(": ")
    return f"raise {exc}({msg!r})\n"


def patched_so(dest: Path, glibc: str = "9.9.9") -> Path:
    """A copy of a real tiny .so (torch's _C stub) whose GLIBC_2.2.5 need reads GLIBC_<glibc>."""
    data = Path(torch._C.__file__).read_bytes()
    old, new = b"GLIBC_2.2.5\0", f"GLIBC_{glibc}\0".encode()
    assert len(old) == len(new) and old in data
    dest.write_bytes(data.replace(old, new))
    return dest


def fake_flash_attn(root: Path, init_source: str, version: str = "2.7.4.post1", with_so: bool = False) -> Path:
    """``root`` becomes a site dir holding flash_attn/ and its flash_attn-<version>.dist-info."""
    pkg = root / "flash_attn"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(init_source)
    files = ["flash_attn/__init__.py"]
    if with_so:
        patched_so(root / "flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so")
        files.append("flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so")
    info = root / f"flash_attn-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flash_attn\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    return root


def fake_flash_attn_4_only(root: Path, version: str = "4.0.0b36") -> Path:
    """What flash-attn-4 alone installs: a ``flash_attn`` namespace (no __init__.py) holding
    ``cute`` with its flash_attn_func, and no FA2 ``flash_attn_func``."""
    cute = root / "flash_attn" / "cute"
    cute.mkdir(parents=True)
    (cute / "__init__.py").write_text("def flash_attn_func(q, k, v, causal=False):\n    raise RuntimeError('fake')\n")
    info = root / f"flash_attn_4-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flash-attn-4\nVersion: {version}\n")
    (info / "RECORD").write_text("flash_attn/cute/__init__.py,,\n")
    return root
