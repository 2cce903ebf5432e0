"""Node health: whether each GPU the node gives the run is fit to train (docs/preflight.md, "Node health").

Long runs die from sick hardware more than from broken installs. On the node, inside the probe,
``gather`` reads each GPU through NVML and runs a GEMM canary on it; in the driver, ``judge``
turns those readings into checks and the node's verdict. NVML is reached through one seam,
``NVML``: ``Pynvml`` reads the real library; tests name a canned one with
``FLASH_ORCH_NVML=module:factory`` in the node's environment, so every cause is exercised without a GPU.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from orchestrator.preflight.rules import Cause

NVML_ENV = "FLASH_ORCH_NVML"
# The line's start before a child's facts on stdout, this module's and the probe's alike.
MARKER = "PREFLIGHT-FACTS "

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
# The GEMM canary: one bf16 matmul of fixed, seeded inputs; big enough to reach a GPU's peak.
GEMM_N = 8192
GEMM_SEED = 1234
GEMM_ITERS = 20
# A GPU whose canary runs below this fraction of the node's median TFLOP/s holds every step back.
STRAGGLER_FRACTION = 0.9
# NVML's throttle-reason bits that mean the hardware, not the workload, holds the clock down.
THROTTLE_BITS = {"hw_slowdown": 0x8, "sw_thermal": 0x20, "hw_thermal": 0x40, "power_brake": 0x80}


# ---------------------------------------------------------------- the seam


class NVML(Protocol):
    def readings(self) -> list[dict]:
        """One dict per GPU: index, name, uuid, and each reading below (None: not supported).

        ecc_volatile / ecc_aggregate: uncorrectable ECC errors since boot / over the GPU's life;
        retired_pending, remapped_pending, remapped_failed: page retirement and row remapping;
        throttle: names from THROTTLE_BITS now active; persistence, mig: modes on or off;
        pcie_gen, pcie_gen_max, pcie_width, pcie_width_max; nvlinks: active NVLinks."""


class Pynvml:
    """The real NVML (nvidia-ml-py)."""

    def readings(self) -> list[dict]:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [self._one(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()

    @staticmethod
    def _one(nv, index: int) -> dict:
        h = nv.nvmlDeviceGetHandleByIndex(index)

        def read(fn, *args):
            try:
                return fn(h, *args)
            except nv.NVMLError:  # not supported on this GPU or driver: the check is skipped
                return None

        remapped = read(nv.nvmlDeviceGetRemappedRows)  # (correctable, uncorrectable, pending, failed)
        throttle = read(nv.nvmlDeviceGetCurrentClocksThrottleReasons)
        mig = read(nv.nvmlDeviceGetMigMode)  # (current, pending)
        links = [read(nv.nvmlDeviceGetNvLinkState, link) for link in range(nv.NVML_NVLINK_MAX_LINKS)]
        unc = nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return {
            "index": index, "name": nvml_text(nv.nvmlDeviceGetName(h)), "uuid": nvml_text(nv.nvmlDeviceGetUUID(h)),
            "ecc_volatile": read(nv.nvmlDeviceGetTotalEccErrors, unc, nv.NVML_VOLATILE_ECC),
            "ecc_aggregate": read(nv.nvmlDeviceGetTotalEccErrors, unc, nv.NVML_AGGREGATE_ECC),
            "retired_pending": _flag(read(nv.nvmlDeviceGetRetiredPagesPendingStatus)),
            "remapped_pending": bool(remapped[2]) if remapped else None,
            "remapped_failed": bool(remapped[3]) if remapped else None,
            "throttle": None if throttle is None else [n for n, bit in THROTTLE_BITS.items() if throttle & bit],
            "persistence": _flag(read(nv.nvmlDeviceGetPersistenceMode)),
            "pcie_gen": read(nv.nvmlDeviceGetCurrPcieLinkGeneration),
            "pcie_gen_max": read(nv.nvmlDeviceGetMaxPcieLinkGeneration),
            "pcie_width": read(nv.nvmlDeviceGetCurrPcieLinkWidth),
            "pcie_width_max": read(nv.nvmlDeviceGetMaxPcieLinkWidth),
            "mig": _flag(mig[0]) if mig else None,
            "nvlinks": sum(1 for s in links if s),
        }


def nvml_text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flag(value) -> Optional[bool]:
    return None if value is None else bool(value)


def nvml_from_env() -> NVML:
    """The real NVML, or the replacement ``FLASH_ORCH_NVML=module:factory`` names (tests)."""
    spec = os.environ.get(NVML_ENV)
    if not spec:
        return Pynvml()
    module, _, factory = spec.partition(":")
    return getattr(importlib.import_module(module), factory)()


# ---------------------------------------------------------------- on the node


def gemm_canary(torch, index: int) -> dict:
    """One GPU's canary: the output's SHA-256 (bitwise comparable across GPUs of one model and
    driver) and its TFLOP/s."""
    device = torch.device("cuda", index)
    # Drawn on the GPU (seconds less than on the CPU): CUDA's Philox gives the same numbers on
    # every GPU for one seed and torch build.
    gen = torch.Generator(device).manual_seed(GEMM_SEED)
    a, b = (torch.randn(GEMM_N, GEMM_N, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = a @ b  # warm-up: cuBLAS picks its kernel here
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GEMM_ITERS):
        torch.matmul(a, b, out=out)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / GEMM_ITERS
    digest = hashlib.sha256(out.view(torch.int16).cpu().numpy().tobytes()).hexdigest()
    return {"gpu": index, "sha256": digest, "tflops": round(2 * GEMM_N**3 / seconds / 1e12, 1)}


def canary(torch_ok: bool) -> dict:
    """The canary on every GPU torch sees, or why it was skipped."""
    try:
        if not torch_ok:
            raise ImportError("see the probe's torch facts")
        import torch
    except Exception as e:  # a broken torch is reported by the probe; the canary just cannot run
        return {"skipped": f"torch does not import ({type(e).__name__}: {e})"}

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU: the GEMM canary runs on GPUs only"}
    results = []
    for i in range(torch.cuda.device_count()):
        try:
            results.append(gemm_canary(torch, i))
        except Exception as e:  # a GPU that cannot run a matmul is a finding, not a crash
            results.append({"gpu": i, "error": f"{type(e).__name__}: {e}".strip()[-2000:]})
    return {"gpus": results}


def gather(torch_ok: bool, nvml: Optional[NVML] = None) -> dict:
    """The node's health facts (the probe's ``health``). Where NVML finds GPUs, the canary runs
    and NVML is read again after it, so the PCIe link is read awake (an idle GPU lowers its
    link's generation to save power)."""
    started = time.monotonic()
    nvml = nvml or nvml_from_env()
    out: dict = {}
    try:
        out["gpus"] = nvml.readings()
    except Exception as e:  # no NVML library (a CPU node) or no driver
        out["nvml_error"] = f"{type(e).__name__}: {e}".strip()
    out["canary"] = canary(torch_ok) if out.get("gpus") else {"skipped": "NVML finds no GPU"}
    if "gpus" in out["canary"]:
        out["gpus"] = nvml.readings()
    out["seconds"] = round(time.monotonic() - started, 3)
    return out


def print_facts(gather: Callable[[Callable[[dict], None]], dict]) -> int:
    """A child's ``main``: the facts ``gather(emit)`` returns, and any it hands ``emit`` sooner,
    each printed on stdout after MARKER."""
    import sys

    from trainer import strict_json

    real_stdout = sys.stdout

    def emit(facts: dict) -> None:
        real_stdout.write(MARKER + strict_json.dumps(facts, default=str) + "\n")
        real_stdout.flush()

    sys.stdout = sys.stderr  # whatever the checks print must not mix with the facts
    try:
        facts = gather(emit)
    finally:
        sys.stdout = real_stdout
    emit(facts)
    return 0


def main() -> int:
    """``python -m orchestrator.preflight.health``: the health facts alone, for a node whose cached
    probe result is reused (its hardware may have changed since)."""
    return print_facts(lambda emit: gather(torch_ok=True))


# ---------------------------------------------------------------- causes (pure)


CAUSES = {  # code -> (summary, fix); one line each, as the install causes of rules.py
    "ecc_uncorrected": ("uncorrectable ECC errors since boot",
                        "drain the node: reset the GPU (nvidia-smi -r) or reboot, and replace it if they return"),
    "ecc_history": ("uncorrectable ECC errors in the GPU's lifetime (none since boot)",
                    "watch it: nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER; replace it if they come back"),
    "retired_pending": ("memory pages wait to be retired",
                        "reset the GPU (nvidia-smi -r) or reboot the node so the pages are retired"),
    "remap_pending": ("rows wait to be remapped", "reset the GPU (nvidia-smi -r) or reboot so the rows are remapped"),
    "remap_failed": ("row remapping failed: the GPU's memory has no spare rows left",
                     "the GPU needs replacing (RMA); leave the node out until it is"),
    "hw_slowdown": ("the hardware holds the clock down now ({0}): the GPU runs at a fraction of its speed",
                    "check cooling and power supply, and nvidia-smi -q -d PERFORMANCE"),
    "thermal": ("the GPU is thermally throttled now ({0})",
                "check fans, airflow and inlet temperature (nvidia-smi -q -d TEMPERATURE)"),
    "persistence_off": ("persistence mode is off: every process start reloads the driver state",
                        "nvidia-smi -pm 1 (or run nvidia-persistenced)"),
    "pcie_degraded": ("the PCIe link runs at {0}, below its maximum {1}",
                      "reseat the GPU or its riser, check the slot and BIOS settings; host<->GPU copies are slower"),
    "mig_on": ("MIG mode is on: the GPU is split into instances training cannot use as one GPU",
               "nvidia-smi -i <gpu> -mig 0, then reset the GPU"),
    "gpu_missing": ("the node has {0} GPU(s) where {1} are expected",
                    "a GPU fell off the bus or is hidden: check nvidia-smi and dmesg (Xid 79), reboot or fix the node"),
    "nvml_unavailable": ("NVML cannot be read although GPUs are expected ({0})",
                         "install the NVIDIA driver (its libnvidia-ml) on the node, or check it with nvidia-smi"),
    "gemm_error": ("the GEMM canary failed on the GPU ({0})", "check the GPU with nvidia-smi and dmesg for Xid errors"),
    "gemm_mismatch": ("the GEMM canary's result differs bitwise from the node's other {0} GPUs",
                      "silent data corruption: drain the node and run DCGM diagnostics (dcgmi diag -r 3)"),
    "gemm_straggler": ("the GEMM canary runs at {0:.0f} TFLOP/s, {1:.0%} of the node's median",
                       "a slow GPU holds every step back: check its clocks, power and temperature (nvidia-smi -q)"),
}

# Where a cause leaves the node: fail makes it unhealthy, warn degraded.
FAILS = {"ecc_uncorrected", "remap_failed", "hw_slowdown", "mig_on", "gpu_missing", "nvml_unavailable",
         "gemm_error", "gemm_mismatch"}


def cause(code: str, *args) -> Cause:
    summary, fix = CAUSES[code]
    return Cause(code, summary.format(*args), fix)


@dataclass(frozen=True)
class Check:
    """One check of one GPU (``gpu`` None: of the node): ok, warn, fail or skip, and why."""

    check: str
    gpu: Optional[int]
    status: str
    message: str
    cause: Optional[Cause] = None

    def to_json(self) -> dict:
        return {"check": self.check, "gpu": self.gpu, "status": self.status, "message": self.message,
                **({"code": self.cause.code, "fix": self.cause.hint} if self.cause else {})}

    @property
    def where(self) -> str:
        return f"{self.check} (GPU {self.gpu})" if self.gpu is not None else self.check


def _found(check: str, gpu: Optional[int], code: str, *args) -> Check:
    c = cause(code, *args)
    return Check(check, gpu, "fail" if code in FAILS else "warn", c.summary, c)


def _skip(check: str, r: dict) -> Check:
    return Check(check, r["index"], "skip", "not supported by this GPU or driver")


def _ecc(r: dict) -> Check:
    if r.get("ecc_volatile") is None:
        return _skip("ecc", r)
    if r["ecc_volatile"]:
        return _found("ecc", r["index"], "ecc_uncorrected")
    if r.get("ecc_aggregate"):
        return _found("ecc", r["index"], "ecc_history")
    return Check("ecc", r["index"], "ok", "no uncorrectable ECC errors")


def _memory(r: dict) -> Check:
    for code in ("remapped_failed", "remapped_pending", "retired_pending"):
        if r.get(code):
            return _found("memory", r["index"], code.replace("remapped", "remap"))
    if r.get("remapped_pending") is None and r.get("retired_pending") is None:
        return _skip("memory", r)
    return Check("memory", r["index"], "ok", "no rows or pages pending or failed")


def _throttle(r: dict) -> Check:
    throttle = r.get("throttle")
    if throttle is None:
        return _skip("throttle", r)
    if any(t in ("hw_slowdown", "power_brake") for t in throttle):
        return _found("throttle", r["index"], "hw_slowdown", ", ".join(throttle))
    if throttle:
        return _found("throttle", r["index"], "thermal", ", ".join(throttle))
    return Check("throttle", r["index"], "ok", "no hardware or thermal slowdown")


def _persistence(r: dict) -> Check:
    if r.get("persistence") is None:
        return _skip("persistence", r)
    return Check("persistence", r["index"], "ok", "persistence mode on") if r["persistence"] \
        else _found("persistence", r["index"], "persistence_off")


def _pcie(r: dict) -> Check:
    now, top = (r.get("pcie_gen"), r.get("pcie_width")), (r.get("pcie_gen_max"), r.get("pcie_width_max"))
    if None in now or None in top:
        return _skip("pcie", r)
    if now[0] < top[0] or now[1] < top[1]:
        return _found("pcie", r["index"], "pcie_degraded", f"gen{now[0]} x{now[1]}", f"gen{top[0]} x{top[1]}")
    return Check("pcie", r["index"], "ok", f"gen{now[0]} x{now[1]}")


def _mig(r: dict) -> Check:
    if r.get("mig") is None:
        return _skip("mig", r)
    return _found("mig", r["index"], "mig_on") if r["mig"] else Check("mig", r["index"], "ok", "MIG mode off")


# The checks of one GPU's readings, in the table's order. Adding a check: its reading in
# Pynvml._one (and tests/fake_nvml.py's healthy default), its causes in CAUSES (and FAILS where it
# leaves the node out), and a function in this list (docs/preflight.md).
GPU_CHECKS: list[Callable[[dict], Check]] = [_ecc, _memory, _throttle, _persistence, _pcie, _mig]


def _canary_checks(section: dict, names: dict[int, str]) -> list[Check]:
    """Bitwise agreement among the GPUs of one model (one node: one driver), and speed against the node's median."""
    if "skipped" in section:
        return [Check("gemm", None, "skip", section["skipped"])]
    results = section.get("gpus") or []
    out = [_found("gemm", r["gpu"], "gemm_error", r["error"].splitlines()[-1]) for r in results if "error" in r]
    ran = [r for r in results if "error" not in r]
    bad: set[int] = set()
    by_model: dict[str, list[dict]] = {}
    for r in ran:
        by_model.setdefault(names.get(r["gpu"], "?"), []).append(r)
    for group in by_model.values():
        counts = Counter(r["sha256"] for r in group).most_common()
        if len(counts) < 2:
            continue
        # The majority's result is taken as right; with no majority every GPU of the model is suspect.
        agreed = counts[0][0] if counts[0][1] > counts[1][1] else None
        for r in group:
            if r["sha256"] != agreed:
                out.append(_found("gemm", r["gpu"], "gemm_mismatch", len(group) - 1))
                bad.add(r["gpu"])
    median = statistics.median(r["tflops"] for r in ran) if ran else 0
    for r in ran:
        if r["gpu"] in bad:
            continue
        if r["tflops"] < STRAGGLER_FRACTION * median:
            out.append(_found("gemm", r["gpu"], "gemm_straggler", r["tflops"], r["tflops"] / median))
        else:
            out.append(Check("gemm", r["gpu"], "ok", f"{r['tflops']:g} TFLOP/s, same result as the node's other GPUs"))
    return sorted(out, key=lambda c: c.gpu if c.gpu is not None else -1)


# ---------------------------------------------------------------- the verdict (pure)


@dataclass
class Health:
    status: str  # healthy | degraded | unhealthy
    checks: list[Check] = field(default_factory=list)
    seconds: Optional[float] = None  # the node's health checks, as the probe timed them

    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status in ("warn", "fail")]

    @property
    def reason(self) -> Optional[str]:
        """One line: each failed (else warned) check, where and why."""
        worst = [c for c in self.checks if c.status == "fail"] or self.problems()
        return "; ".join(f"{c.where}: {c.message}" for c in worst) or None

    def to_json(self) -> dict:
        return {"status": self.status, "seconds": self.seconds, "checks": [c.to_json() for c in self.checks]}


def judge(facts: Optional[dict], expected_gpus: int) -> Health:
    """The node's health from its probe facts; ``expected_gpus``: what Ray advertises on the node,
    or ``--expect-gpus``."""
    section = (facts or {}).get("health")
    if section is None:  # a probe older than these checks, or one that failed
        return Health(HEALTHY, [Check("health", None, "skip", "no health facts from this node's probe")])
    readings = section.get("gpus") or []
    checks: list[Check] = []
    if "nvml_error" in section:
        checks.append(_found("nvml", None, "nvml_unavailable", section["nvml_error"]) if expected_gpus
                      else Check("nvml", None, "skip", f"no NVML, no GPU expected ({section['nvml_error']})"))
    elif len(readings) < expected_gpus:
        checks.append(_found("gpu_count", None, "gpu_missing", len(readings), expected_gpus))
    else:
        checks.append(Check("gpu_count", None, "ok", f"{len(readings)} GPU(s), {expected_gpus} expected"))
    for r in readings:
        checks += [check(r) for check in GPU_CHECKS]
    checks += _canary_checks(section.get("canary") or {"skipped": "not run"}, {r["index"]: r["name"] for r in readings})
    statuses = {c.status for c in checks}
    status = UNHEALTHY if "fail" in statuses else DEGRADED if "warn" in statuses else HEALTHY
    return Health(status, checks, section.get("seconds"))


def link_class(facts: Optional[dict]) -> Optional[str]:
    """'nvlink' when every GPU of the node has an active NVLink, else 'pcie'; None without readings."""
    readings = ((facts or {}).get("health") or {}).get("gpus") or []
    if not readings:
        return None
    return "nvlink" if all(r.get("nvlinks") for r in readings) else "pcie"


if __name__ == "__main__":
    raise SystemExit(main())
