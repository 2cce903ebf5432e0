"""The preflight report: one record per node (facts and verdict), shown as a table, saved as
``preflight.json`` and ``flash_attention_log.txt``, which the planner reads (``plan.nodes_from_preflight``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from orchestrator.preflight.health import Health
from orchestrator.preflight.interconnect import InterconnectReport, text_table
from orchestrator.preflight.settings import ProbeSettings
from orchestrator.preflight.rules import Verdict
from orchestrator import rundir
from orchestrator.results import PREFLIGHT_FILE
from trainer import strict_json
from trainer.attention import LOG_FILE, guard

# flash_nodes' key for the nodes whose kernel choice was still being timed when the plan was made.
PENDING = "(timing)"
COLUMNS = ("node", "GPUs", "CC", "driver", "CUDA", "GLIBC", "torch", "flash-attn", "probe", "health", "verdict",
           "reason")
_REASON_WIDTH = 90


@dataclass
class NodeReport:
    node_id: str
    address: str
    cpus: float
    gpus: float  # as Ray advertises them
    labels: dict[str, str]
    facts: Optional[dict]  # None when the probe crashed, hung or returned garbage
    verdict: Verdict
    probe_seconds: Optional[float] = None
    cache: Optional[dict] = None  # node.probe_or_reuse's: reused or not, the entry's path, why not
    health: Optional[Health] = None  # None: not judged (reports made before the health checks)

    @property
    def name(self) -> str:
        return f"{self.node_id[:8]} ({self.address})"

    @property
    def unhealthy(self) -> bool:
        return self.health is not None and self.health.status == "unhealthy"

    @property
    def reused(self) -> bool:
        return bool((self.cache or {}).get("reused"))

    def row(self) -> list[str]:
        f = self.facts or {}
        gpus = f.get("gpus") or []
        names = Counter(g["name"] for g in gpus)
        gpu_text = ", ".join(f"{n}x {name}" for name, n in names.items()) if gpus else (
            "0" if self.facts else f"{self.gpus:g} (Ray)")
        driver = f.get("driver") or {}
        torch_f = f.get("torch") or {}
        dists = (f.get("flash_attn") or {}).get("distributions") or []
        v = self.verdict
        if v.flash_ok:
            timed = v.kernel_timings.get(v.flash_kernel)
            kernel = "standard: timed fastest" if v.flash_kernel == "standard" else v.flash_kernel
            verdict = ("flash (kernels timed while workers start)" if v.timing_pending else
                       f"flash ({kernel}, {timed:.3g} ms)" if timed else f"flash ({kernel})")
            codes = ", ".join(sorted({i.cause.code for i in v.issues}))
            reason = f"issues logged: {codes}" if codes else "-"
        else:
            verdict, reason = "standard", v.reason or "-"
        if len(reason) > _REASON_WIDTH:
            reason = reason[:_REASON_WIDTH - 3] + "..."
        return [
            self.name, gpu_text, ",".join(sorted({g["capability"] for g in gpus})) or "-",
            (driver.get("version") or "-") + (f" (CUDA {driver['cuda']})" if driver.get("cuda") else ""),
            torch_f.get("cuda") or ("-" if self.facts else "?"), f.get("glibc") or ("-" if self.facts else "?"),
            torch_f.get("version") or ("error" if torch_f.get("error") else "?"),
            ", ".join(f"{d['name']} {d.get('version')}" for d in dists) or ("-" if self.facts else "?"),
            "reused" if self.reused else "-" if self.probe_seconds is None else f"{self.probe_seconds:.1f} s",
            self.health.status if self.health else "-", verdict, reason,
        ]

    def smallest_gpu_bytes(self) -> Optional[int]:
        sizes = [g["memory_bytes"] for g in (self.facts or {}).get("gpus") or [] if g.get("memory_bytes")]
        return min(sizes) if sizes else None

    def to_json(self) -> dict:
        return {"node_id": self.node_id, "address": self.address, "cpus": self.cpus, "gpus": self.gpus,
                "labels": self.labels, "probe_seconds": self.probe_seconds, "cache": self.cache,
                "health": self.health.to_json() if self.health else None, "verdict": self.verdict.to_json(),
                "facts": self.facts}


@dataclass
class PreflightReport:
    nodes: list[NodeReport]
    settings: ProbeSettings
    notes: list[str] = field(default_factory=list)  # plain statements: no alive nodes, no GPUs
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    interconnect: Optional[InterconnectReport] = None  # the all-reduce checks, once the plan is known

    def flash_nodes(self) -> dict[str, list[str]]:
        """Flash kernel -> the nodes where it will run."""
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            if n.verdict.flash_ok:
                out.setdefault(PENDING if n.verdict.timing_pending else n.verdict.flash_kernel, []).append(n.name)
        return out

    def _timed_choice(self, kernel: str) -> str:
        """'kernel X (Y ms/iter), runner-up Z (W ms)' from the first node that timed it."""
        from trainer.attention import timing  # imports torch, which the driver loads while Ray starts

        if kernel == PENDING:
            return "the kernel timed fastest at the run's shape (timing while the workers start)"
        for n in self.nodes:
            if n.verdict.flash_kernel == kernel and n.verdict.kernel_timings:
                return timing.describe(kernel, n.verdict.kernel_timings)
        return f"kernel {kernel}"

    # ------------------------------------------------------------ for people

    def table(self) -> list[str]:
        lines = text_table([list(COLUMNS)] + [n.row() for n in self.nodes])
        reused = sum(n.reused for n in self.nodes)
        if reused:
            lines.append(f"preflight: {reused} of {len(self.nodes)} node(s) reused their cached result (nothing it "
                         "depends on changed); --fresh-preflight probes again")
        lines += [f"note: {n}" for n in self.notes]
        for n in self.nodes:
            for c in n.health.problems() if n.health else []:
                lines.append(f"health {n.name} [{c.cause.code}] {c.where}: {c.message}; fix: {c.cause.hint}")
        return lines + (self.interconnect.table() if self.interconnect else [])

    def log_text(self) -> str:
        s = self.settings
        lines = [f"Flash attention compatibility log - preflight at {self.created}",
                 f"checked: causal fwd+bwd, head dim {s.shape.head_dim}, {s.shape.n_heads} query / {s.shape.n_kv_heads} kv heads, "
                 f"dtype {s.shape.dtype}; {guard.DISABLED_REASON if s.disable_flash_attn else 'flash attention enabled'}",
                 *[f"note: {n}" for n in self.notes], ""]
        for n in self.nodes:
            v = n.verdict
            host = (n.facts or {}).get("hostname", "?")
            outcome = (f"standard attention: {v.reason}" if not v.flash_ok else
                       "flash attention: the kernels that passed are being timed at the run's shape while the "
                       "workers start; each worker takes the fastest (its record's kernel_timings)" if v.timing_pending
                       else
                       "flash variant: standard attention, timed fastest at the run's shape" if v.flash_kernel == "standard"
                       else f"flash attention: {v.flash_kernel}")
            lines.append(f"node {n.node_id} ({host}, {n.address}): {outcome}")
            if v.flash_ok and v.kernel_timings:
                lines.append("  timed at the run's shape: " + ", ".join(f"{k} {ms:.3g} ms" for k, ms in
                                                                        sorted(v.kernel_timings.items(), key=lambda kv: kv[1])))
            if n.reused:
                when = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(n.cache["created"]))
                lines.append(f"  preflight result reused from {n.cache['path']} (probed at {when}; "
                             "nothing it depends on has changed since)")
            if n.health is not None:
                lines.append(f"  health: {n.health.status}" + (f" ({n.health.seconds:.1f} s)" if n.health.seconds
                                                              is not None else ""))
                for c in n.health.problems():
                    lines.append(f"  [{c.cause.code}] {c.where}: {c.message}")
                    lines.append(f"    fix: {c.cause.hint}")
            if not v.issues:
                lines.append("  no issues found")
            for issue in v.issues:
                c = issue.cause
                lines.append(f"  [{c.code}] {issue.check}: {c.summary}")
                lines.append(f"    fix: {c.hint}")
                raw = (issue.error or "").strip().splitlines() or ["(no error text)"]
                lines.append("    raw error:")
                lines += [f"      {line}" for line in raw]
            lines.append("")
        return "\n".join(lines)

    def outcome_lines(self) -> list[str]:
        """The startup lines: flash disabled, or which flash kernel runs where."""
        flash = self.flash_nodes()
        if not flash:
            return ["Flash Attention is disabled - will use standard attention implementation"]
        lines = [f"Flash attention: {self._timed_choice(k)} on {', '.join(nodes)}" for k, nodes in flash.items()]
        std = [n.name for n in self.nodes if not n.verdict.flash_ok]
        if std:
            lines.append(f"Standard attention on {', '.join(std)} (see flash_attention_log.txt)")
        return lines

    # ------------------------------------------------------------ for scripts

    def to_json(self) -> dict:
        return {"created": self.created, "settings": asdict(self.settings), "notes": self.notes,
                "flash_nodes": self.flash_nodes(), "nodes": [n.to_json() for n in self.nodes],
                "interconnect": self.interconnect.to_json() if self.interconnect else None}

    def write(self, directory: Path) -> tuple[Path, Path]:
        """preflight.json and flash_attention_log.txt in ``directory``; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / LOG_FILE
        rundir.write_text(log_path, self.log_text())
        return self.write_json(directory), log_path

    def write_json(self, directory: Path) -> Path:
        path = directory / PREFLIGHT_FILE
        rundir.write_text(path, strict_json.dumps(self.to_json(), indent=2, default=str) + "\n")
        return path

    def complete_timing(self, node_id: str, facts: dict, verdict: Verdict,
                        probe_seconds: Optional[float] = None) -> Optional[str]:
        """Put a node's complete facts in place of those its plan was made from, before its kernel
        timing ended (``probe_seconds``: the whole probe's); the log's line on what the timing
        chose (None if the node was not pending)."""
        for n in self.nodes:
            if n.node_id == node_id and n.verdict.timing_pending:
                n.facts, n.verdict = facts, verdict
                n.cache = dict(n.cache or {}, timing="ended after the plan", plan_seconds=n.probe_seconds)
                n.probe_seconds = probe_seconds if probe_seconds is not None else n.probe_seconds
                if not verdict.flash_ok:
                    return f"node {node_id}: kernel timing ended: {verdict.reason}"
                from trainer.attention import timing

                return (f"node {node_id}: kernel timing ended after the plan: "
                        f"{timing.describe(verdict.flash_kernel, verdict.kernel_timings)}")
        return None
