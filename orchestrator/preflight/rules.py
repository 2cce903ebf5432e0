"""From facts to decisions: classify errors into causes a user can act on, and decide per node
which attention backend can run. Pure functions over the probe's JSON facts (see probe.py), so
every rule is unit-tested on canned facts and real error strings, without a GPU.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from orchestrator.preflight import elf
from trainer.attention import guard


@dataclass(frozen=True)
class Cause:
    code: str
    summary: str  # what is wrong, one line
    hint: str  # what to do about it, one line


# ---------------------------------------------------------------- error text -> cause

_PATTERNS: list[tuple[re.Pattern, str, str, str]] = [
    # (pattern, code, summary template, hint); the first match wins, so specific before general.
    (re.compile(r"blocked: flash attention is disabled"), "disabled",
     "flash-attn imports are blocked in this process (DISABLE_FLASH_ATTN=1)",
     "expected with --disable-flash-attn; drop the flag to use flash attention"),
    (re.compile(r"version `GLIBC_([\d.]+)' not found"), "glibc_too_old",
     "the node's GLIBC is older than the GLIBC_{0} this build needs",
     "install a flash-attn wheel built on an older distro, build it on this node "
     "(pip install flash-attn --no-build-isolation), or move to a newer OS image"),
    (re.compile(r"version `(GLIBCXX_[\d.]+|CXXABI_[\d.]+)' not found"), "libstdcxx_too_old",
     "the libstdc++ in use is older than the {0} this build needs",
     "put a newer libstdc++ first (conda install -c conda-forge libstdcxx-ng, or LD_LIBRARY_PATH to a newer "
     "GCC's lib64), or rebuild flash-attn on this node"),
    (re.compile(r"undefined symbol: (_ZN[K]?(?:3c10|2at|5torch)\w*)"), "torch_abi_mismatch",
     "flash-attn was built against another torch version or C++ ABI (missing {0})",
     "reinstall flash-attn against this torch (pip install --force-reinstall --no-build-isolation flash-attn), "
     "or install the torch version it was built for"),
    (re.compile(r"undefined symbol: (\S+)"), "undefined_symbol",
     "a compiled library misses the symbol {0}: built against other library versions",
     "reinstall flash-attn built against this node's torch and CUDA"),
    (re.compile(r"(lib(?:cudart|cublas\w*|cudnn\w*|nvrtc|cusparse|cufft|curand|nvJitLink|cuda)\.so[\d.]*): "
                r"cannot open shared object file"), "cuda_runtime_mismatch",
     "{0} is missing: flash-attn was built for another CUDA version than this node has",
     "install the flash-attn wheel for torch's CUDA (see torch.version.cuda), or the CUDA runtime it needs"),
    (re.compile(r"No CTK flavor installed"), "cutlass_dsl_no_toolkit",
     "flash-attn-4's CUTLASS DSL is installed without its CUDA toolkit libraries",
     "pip install 'nvidia-cutlass-dsl[cu13]' for a CUDA 13 torch, or nvidia-cutlass-dsl alone (CUDA 12): "
     "match torch.version.cuda"),
    (re.compile(r"(\S+\.so[\d.]*): cannot open shared object file"), "missing_library",
     "the shared library {0} is missing on this node",
     "install the package that provides it, or fix LD_LIBRARY_PATH"),
    (re.compile(r"FlashAttention only supports Ampere GPUs or newer"), "gpu_too_old",
     "the GPU is older than Ampere (compute capability < 8.0), which flash-attn needs",
     "use standard attention or PyTorch SDPA on this GPU, or run flash variants on Ampere or newer nodes"),
    (re.compile(r"no kernel image is available for execution on the device"), "arch_not_in_build",
     "the build has no kernels for this GPU's architecture",
     "install a build that includes this GPU's sm_XY, or rebuild with it in TORCH_CUDA_ARCH_LIST"),
    (re.compile(r"CUDA driver version is insufficient|driver on your system is too old|cudaErrorInsufficientDriver"
                r"|CUDA_ERROR_UNSUPPORTED_PTX_VERSION|unsupported toolchain"), "driver_too_old",
     "the NVIDIA driver is too old for the CUDA runtime this build uses",
     "upgrade the NVIDIA driver, or install torch and flash-attn built for an older CUDA"),
    (re.compile(r"head dimension at most (\d+)|[Hh]ead ?dim(?:ension)? (?:should|must) be[^\n]*|"
                r"only supports? head dim\w*[^\n]*"), "head_dim_unsupported",
     "the model's head dim is outside what this kernel supports ({0})",
     "choose model.dim / model.n_heads within the kernel's limits (flash-attn: at most 256, a multiple of 8), "
     "or use standard attention"),
    (re.compile(r"only supports? fp16 and bf16 data type"), "dtype_unsupported",
     "the kernel runs only in fp16 or bf16",
     "train in bf16 (train.dtype: bf16, or auto on GPU)"),
    (re.compile(r"module '(flash_attn[\w.]*)' has no attribute 'flash_attn_func'"), "not_installed",
     "{0} has no flash_attn_func: that kernel is not installed (flash-attn-4 alone installs flash_attn.cute only)",
     "nothing to fix when flash-attn-4 is what you installed; pip install flash-attn for FA2"),
    (re.compile(r"No module named '((?:flash_attn|hopper)[\w.]*)'"), "not_installed",
     "{0} is not installed on this node",
     "pip install flash-attn --no-build-isolation (it builds against this node's torch and CUDA)"),
    (re.compile(r"No module named '([\w.]+)'"), "missing_dependency",
     "flash-attn needs the module {0}, which is not installed",
     "pip install the missing module on this node"),
    (re.compile(r"No available kernel|[Nn]o kernel available"), "sdpa_kernel_unavailable",
     "PyTorch has no such fused kernel for this GPU, dtype and head dim",
     "nothing to fix: another kernel (or standard attention) is used"),
    (re.compile(r"differs from standard attention by"), "wrong_results",
     "the kernel's output or gradients differ from standard attention",
     "this kernel is not used here; report the versions in preflight.json upstream"),
    (re.compile(r"CUDA out of memory|out of memory"), "out_of_memory",
     "the GPU ran out of memory during the check",
     "free the GPU (other processes hold it) and rerun preflight"),
]

UNKNOWN = Cause("unknown", "unrecognised error", "read the raw error below; try `python -c 'import flash_attn'` on the node")


def first_match(patterns: list[tuple[re.Pattern, str, str, str]], text: str) -> Optional[Cause]:
    """The cause of the first (pattern, code, summary template, hint) whose pattern is in ``text``."""
    for pattern, code, summary, hint in patterns:
        m = pattern.search(text)
        if m:
            return Cause(code, summary.format(*([g for g in m.groups() if g] or [m.group(0)])), hint)
    return None


def classify(error_text: str) -> Cause:
    """The cause of an import or kernel error, from its text (a traceback is fine)."""
    return first_match(_PATTERNS, error_text or "") or UNKNOWN


def crash_cause(what: str, signal_name: Optional[str], timed_out: bool) -> Cause:
    """A child process that died or hung instead of raising."""
    if timed_out:
        return Cause("hang", f"{what} did not finish in time",
                     "run it by hand on the node to see where it hangs; flash attention stays off there")
    return Cause("crash", f"{what} killed the process ({signal_name or 'non-zero exit'})",
                 "a broken compiled library: reinstall flash-attn for this node's torch, CUDA and GLIBC")


def predicted_by_elf(required: dict[str, str], glibc: Optional[str], glibcxx: Optional[str]) -> list[Cause]:
    """What the ELF's version needs predict, before anything is imported."""
    causes = []
    for family, have, code, has in (("GLIBC", glibc, "glibc_too_old", f"the node has GLIBC {glibc}"),
                                    ("GLIBCXX", glibcxx, "libstdcxx_too_old",
                                     f"the libstdc++ in use has up to GLIBCXX_{glibcxx}")):
        need = required.get(family)
        if have and need and elf.version_key(need) > elf.version_key(have):
            causes.append(Cause(code, f"its .so needs {family}_{need}, {has}",
                                classify(f"version `{family}_0' not found").hint))
    return causes


# ---------------------------------------------------------------- facts -> verdict


@dataclass
class Issue:
    check: str  # which check found it, e.g. "import flash_attn", "kernel flash_attn_2", "ELF flash-attn 2.7.4"
    cause: Cause
    error: str = ""  # the raw error text

    def to_json(self) -> dict:
        return {"check": self.check, **asdict(self.cause), "error": self.error}


@dataclass
class Verdict:
    """What a node can run. ``backends`` maps each attention backend (standard and every flash
    kernel) to {'ok': bool, 'reason': str}."""

    flash_ok: bool
    flash_kernel: Optional[str]
    reason: Optional[str]  # why flash is off here (None when it is on)
    backends: dict[str, dict] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    kernel_timings: dict[str, float] = field(default_factory=dict)  # kernel -> ms/iter at the run's shape
    # The kernels that passed were still being timed at the run's shape when this verdict was
    # made: ``flash_kernel`` is the first that passed, and the node's workers take the timed choice.
    timing_pending: bool = False

    def to_json(self) -> dict:
        return {"flash_ok": self.flash_ok, "flash_kernel": self.flash_kernel, "reason": self.reason,
                "backends": self.backends, "issues": [i.to_json() for i in self.issues],
                "kernel_timings": self.kernel_timings, "timing_pending": self.timing_pending}


def probe_failed(what: str, cause: Cause, error: str) -> Verdict:
    """A node whose probe crashed, hung or returned garbage: standard attention only."""
    return Verdict(False, None, f"preflight {cause.summary}", {"standard": {"ok": True, "reason": "always available"}},
                   [Issue(what, cause, error)])


def _last_line(text: str) -> str:
    """The last non-empty line: in a traceback, the one that names the exception."""
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def verdict(facts: dict) -> Verdict:
    """The node's verdict from its probe facts (the JSON that probe.py prints)."""
    issues: list[Issue] = []
    backends: dict[str, dict] = {"standard": {"ok": True, "reason": "always available"}}
    fa = facts.get("flash_attn") or {}
    disabled = bool(fa.get("disabled"))

    torch_facts = facts.get("torch") or {}
    if torch_facts.get("error"):
        issues.append(Issue("import torch", classify(torch_facts["error"]), torch_facts["error"]))
    elif facts.get("gpus") and not torch_facts.get("cuda_available"):
        # NVML sees GPUs that torch cannot use: a driver/runtime mismatch, usually.
        err = torch_facts.get("cuda_error") or f"torch {torch_facts.get('version')} (CUDA {torch_facts.get('cuda')}) " \
            "cannot use this node's GPUs"
        issues.append(Issue("torch.cuda", classify(err), err))

    # Predicted from the ELF, before importing: the first thing to read when an import fails.
    glibc, glibcxx = facts.get("glibc"), (facts.get("libstdcxx") or {}).get("GLIBCXX")
    for dist in fa.get("distributions", []):
        for cause in predicted_by_elf(dist.get("requires") or {}, glibc, glibcxx):
            issues.append(Issue(f"ELF of {dist['name']} {dist.get('version')}", cause, cause.summary))

    crashed_imports = []
    for imp in fa.get("imports", []):
        if imp.get("skipped") or imp.get("ok"):
            continue
        what = f"import {imp['module']}"
        if imp.get("timed_out") or imp.get("signal"):
            cause = crash_cause(what, imp.get("signal"), bool(imp.get("timed_out")))
            crashed_imports.append(f"{what}: {cause.summary}")
        else:
            cause = classify(imp.get("error", ""))
        issues.append(Issue(what, cause, imp.get("error", "")))

    flash_kernel = None
    for name, result in (facts.get("kernels") or {}).items():
        if result.get("ok"):
            backends[name] = {"ok": True, "reason": "passed a causal fwd+bwd check against standard attention"}
            flash_kernel = flash_kernel or name
        elif result.get("skipped"):
            backends[name] = {"ok": False, "reason": result["skipped"]}
        else:
            cause = classify(result.get("error", ""))
            backends[name] = {"ok": False, "reason": f"{cause.code}: {cause.summary}"}
            issues.append(Issue(f"kernel {name}", cause, result.get("error", "")))

    if disabled:
        return Verdict(False, None, guard.DISABLED_REASON, backends, issues)
    if crashed_imports:
        # A worker told ATTN_IMPL=flash may import flash-attn (we or third-party code do); only
        # DISABLE_FLASH_ATTN=1, which means standard attention, keeps a crashing import out of it.
        return Verdict(False, None, "; ".join(crashed_imports), backends, issues)
    if flash_kernel:
        # Timed at the run's shape, the fastest that passed wins over the first in order.
        selection = facts.get("kernel_selection") or {}
        timed = selection.get("kernel")
        if timed and backends.get(timed, {}).get("ok"):
            return Verdict(True, timed, None, backends, issues, dict(selection.get("timings") or {}))
        return Verdict(True, flash_kernel, None, backends, issues, timing_pending=bool(selection.get("deferred")))
    failed = [f"{n}: {b['reason']}" for n, b in backends.items() if n != "standard"]
    if torch_facts.get("error"):
        reason = f"torch does not import: {_last_line(torch_facts['error'])}"
    elif not failed:
        reason = "no flash kernel was checked"
    else:
        reason = "no flash kernel passed: " + "; ".join(failed)
    return Verdict(False, None, reason, backends, issues)
