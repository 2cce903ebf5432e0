"""Interconnect preflight: a short all-reduce across the devices the plan will use, before training
(docs/clusters.md, "Interconnect check"). What users otherwise find minutes into a run as a hang (a
firewall between nodes, NCCL picking an interface the nodes do not share, a container's tiny
/dev/shm) shows up here in seconds, with its cause and fix. gloo on CPU workers, so the whole path
runs on a laptop. ``run_checks`` is the Ray edge: one actor per rank, pinned to its node, asking
for the GPU its worker will use; the rest is pure.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from orchestrator.preflight.rules import Cause, first_match

log = logging.getLogger(__name__)

FAULT_ENV = "FLASH_ORCH_INTERCONNECT_FAULT"
INJECTED_NCCL_ERROR = ("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error (run with NCCL_DEBUG=INFO "
                       "for details), NCCL version 2.21.5 (injected by " + FAULT_ENV + ")")
# Beyond this many nodes, each node is paired with the next only (a ring), not with every other.
MAX_ALL_PAIRS_NODES = 8
# Time for Ray to start the actors on top of the check's own timeout.
STARTUP_MARGIN_S = 60.0
# The bus bandwidth below which a check within one node fails, by the node's link class (health.link_class):
# far under what a sound link reaches (NVLink: hundreds of GB/s; PCIe 4 or 5 x16: 15-50), so only a
# link that is down, downgraded or bypassed trips it. Across nodes the network varies too much for one floor.
MIN_BUSBW_GBPS = {"nvlink": 100.0, "pcie": 5.0}
_SLOW_HINTS = {"nvlink": "an NVLink is down or unused: check nvidia-smi nvlink --status and nvidia-smi topo -m, and "
                         "that NCCL_P2P_DISABLE is not set",
               "pcie": "check the GPUs' PCIe links (nvidia-smi -q -d PCI; preflight's pcie check) and ACS/IOMMU "
                       "settings that route peer traffic through the CPU"}


@dataclass(frozen=True)
class Group:
    """One all-reduce check: the node of each rank."""

    kind: str  # node | pair
    nodes: tuple[str, ...]

    @property
    def name(self) -> str:
        if self.kind == "node":
            return f"node {self.nodes[0][:8]}"
        return "pair " + " - ".join(n[:8] for n in dict.fromkeys(self.nodes))


@dataclass
class Result:
    group: Group
    backend: str
    status: str  # ok | failed
    bytes: int = 0
    seconds: Optional[float] = None  # per all-reduce, the median of the timed ones
    busbw_gbps: Optional[float] = None
    cause: Optional[Cause] = None
    error: Optional[str] = None
    link: Optional[str] = None  # nvlink | pcie, for a check within a node whose link class is known

    def to_json(self) -> dict:
        return {"check": self.group.name, "kind": self.group.kind, "nodes": list(self.group.nodes),
                "ranks": len(self.group.nodes), "backend": self.backend, "status": self.status, "bytes": self.bytes,
                "seconds": self.seconds, "busbw_gbps": self.busbw_gbps, "link": self.link,
                "cause": asdict(self.cause) if self.cause else None, "error": self.error}


def text_table(rows: list[list[str]]) -> list[str]:
    """Aligned columns, with a rule under the first row (the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]


@dataclass
class InterconnectReport:
    results: list[Result] = field(default_factory=list)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != "ok"]

    def table(self) -> list[str]:
        rows = [["interconnect", "ranks", "backend", "bus bandwidth", "all-reduce", "result"]]
        for r in self.results:
            bw = f"{r.busbw_gbps:.2f} GB/s" if r.busbw_gbps is not None else "-"
            t = f"{r.seconds * 1e3:.1f} ms x {r.bytes / 2**20:g} MiB" if r.seconds is not None else "-"
            rows.append([r.group.name, str(len(r.group.nodes)), r.backend, bw, t,
                         "ok" if r.status == "ok" else f"FAILED [{r.cause.code}] {r.cause.summary}"])
        return text_table(rows) + [f"  fix ({r.group.name}): {r.cause.hint}" for r in self.failures()]

    def to_json(self) -> list[dict]:
        return [r.to_json() for r in self.results]


# ---------------------------------------------------------------- which checks (pure)


def groups(placements: list[list[str]]) -> list[Group]:
    """The checks for a plan, from the node of each worker of each runnable variant.

    Within a node: as many ranks as the most workers any variant puts there (one rank is no
    check). Across nodes: every pair of nodes some variant spans (a ring beyond
    MAX_ALL_PAIRS_NODES nodes), one rank on each.
    """
    per_node: dict[str, int] = {}
    spanned: list[str] = []
    for nodes in placements:
        for node in dict.fromkeys(nodes):
            per_node[node] = max(per_node.get(node, 0), nodes.count(node))
        if len(set(nodes)) > 1:
            spanned += [n for n in dict.fromkeys(nodes) if n not in spanned]
    out = [Group("node", (n,) * k) for n, k in per_node.items() if k > 1]
    if len(spanned) > MAX_ALL_PAIRS_NODES:
        pairs = [(spanned[i], spanned[(i + 1) % len(spanned)]) for i in range(len(spanned))]
    else:
        pairs = list(itertools.combinations(spanned, 2))
    return out + [Group("pair", p) for p in pairs]


def bus_bandwidth(nbytes: int, seconds: float, ranks: int) -> float:
    """GB/s as nccl-tests defines it for all-reduce: algorithm bandwidth x 2(n-1)/n, comparable across rank counts."""
    return nbytes / seconds * 2 * (ranks - 1) / ranks / 1e9


# ---------------------------------------------------------------- error -> cause (pure)

_FIREWALL_HINT = ("open TCP between the nodes (NCCL and gloo use random ports: a firewall or security group that "
                  "allows only Ray's ports blocks them), and set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the "
                  "interface the nodes share (e.g. eth0); NCCL_DEBUG=INFO shows where it stops")

_UNREACHABLE = re.compile(r"Connection refused|No route to host|Connection reset|Network is unreachable|"
                          r"connectFullMesh|Socket Timeout|Connection timed out")
_TIMED_OUT = re.compile(r"[Tt]imed out|[Tt]imeout")

_PATTERNS: list[tuple[re.Pattern, str, str, str]] = [
    (re.compile(r"wrong all-reduce result"), "wrong_result",
     "the all-reduce returned wrong values",
     "a faulty link or GPU: try NCCL_P2P_DISABLE=1 and NCCL_PROTO=Simple, and check the node with nvidia-smi and dmesg"),
    (_UNREACHABLE, "unreachable",
     "the ranks could not connect to each other", _FIREWALL_HINT),
    (re.compile(r"ibv_|NET/IB|InfiniBand|mlx5"), "infiniband",
     "NCCL's InfiniBand transport failed",
     "fix the IB setup (ibstat, rdma devices in the container), or fall back to TCP with NCCL_IB_DISABLE=1"),
    (re.compile(r"unhandled system error|ncclSystemError"), "nccl_system_error",
     "NCCL hit a system error",
     "in containers give /dev/shm room (docker --shm-size=1g or --ipc=host); check NCCL_SOCKET_IFNAME names an "
     "interface every node has; rerun with NCCL_DEBUG=INFO for the failing call"),
    (re.compile(r"unhandled cuda error|ncclUnhandledCudaError|CUDA error"), "nccl_cuda_error",
     "a CUDA call inside NCCL failed",
     "peer-to-peer between these GPUs may be broken: try NCCL_P2P_DISABLE=1; check nvidia-smi topo -m and the driver"),
    (re.compile(r"remote process exited|ncclRemoteError|peer .* closed"), "peer_died",
     "another rank died during the all-reduce",
     "see that node's log (out of memory, a crash, the node lost); the check names the node or pair"),
    (re.compile(r"ncclInternalError|internal error|version mismatch"), "nccl_internal_error",
     "NCCL reported an internal error",
     "the nodes may run different NCCL or torch builds: install the same torch on every node"),
    (re.compile(r"ncclInvalidUsage|invalid usage|Duplicate GPU"), "nccl_invalid_usage",
     "NCCL was used wrongly (for example two ranks on one GPU)",
     "give each worker its own GPU: check CUDA_VISIBLE_DEVICES and Ray's GPU resources on the node"),
]


def classify(error: Optional[str], *, timed_out: bool, where: str, backend: str, timeout_s: float) -> Cause:
    """A failed check's cause and fix, naming the node or pair."""
    text = error or ""
    if not timed_out and _TIMED_OUT.search(text) and not _UNREACHABLE.search(text):
        timed_out = True  # a rank gave up waiting for another (rendezvous or collective timeout)
    if timed_out:
        return Cause("timeout", f"the {backend} all-reduce across {where} did not finish in {timeout_s:g} s (a hang)",
                     _FIREWALL_HINT)
    cause = first_match(_PATTERNS, text)
    if cause:
        return Cause(cause.code, f"{cause.summary} ({where}, {backend})", cause.hint)
    first = text.strip().splitlines()[-1] if text.strip() else "no error text"
    return Cause("error", f"the {backend} all-reduce across {where} failed: {first[:160]}",
                 "rerun with NCCL_DEBUG=INFO (GPU) or TORCH_DISTRIBUTED_DEBUG=DETAIL and read the failing rank's log")


def against_floor(result: Result, link: Optional[str]) -> Result:
    """A GPU check within one node fails when its bus bandwidth is below its link class's floor."""
    floor = MIN_BUSBW_GBPS.get(link)
    if result.group.kind != "node" or result.backend != "nccl" or floor is None:
        return result
    result.link = link
    if result.status == "ok" and result.busbw_gbps < floor:
        result.status = "failed"
        result.cause = Cause("slow_interconnect", f"bus bandwidth {result.busbw_gbps:.1f} GB/s across the "
                             f"{len(result.group.nodes)} GPUs of {result.group.name}, below the {floor:g} GB/s "
                             f"floor of {link}", _SLOW_HINTS[link])
    return result


def failure_message(report: InterconnectReport) -> str:
    """The one-line refusal when a check failed."""
    parts = [f"{r.group.name}: {r.cause.summary}; fix: {r.cause.hint}" for r in report.failures()]
    return "interconnect check failed, training would hang or crash: " + " | ".join(parts)


# ---------------------------------------------------------------- the check on the nodes [ray]


class _Peer:
    """One rank of a check, living on its node (a Ray actor)."""

    def address(self) -> tuple[str, int]:
        import socket

        import ray

        with socket.socket() as s:  # a free port on this node for the rendezvous
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def all_reduce(self, rank: int, world: int, addr: str, port: int, backend: str, nbytes: int, iters: int,
                   timeout_s: float, fault: Optional[str]) -> dict:
        import datetime
        import statistics

        import torch
        import torch.distributed as dist

        if fault and rank == world - 1:
            if fault == "hang":
                time.sleep(10 * timeout_s + 60)
            raise RuntimeError(INJECTED_NCCL_ERROR)
        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            x = torch.full((1024,), float(rank + 1), device=device)
            dist.all_reduce(x)  # correctness and warm-up: the connections are made here
            if x[0].item() != world * (world + 1) / 2:
                raise RuntimeError(f"wrong all-reduce result {x[0].item()} (expected {world * (world + 1) / 2})")
            buf = torch.ones(nbytes // 4, device=device)
            dist.all_reduce(buf)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            times = []
            for _ in range(iters):
                sync()
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                sync()
                times.append(time.perf_counter() - t0)
            return {"seconds": statistics.median(times)}
        finally:
            dist.destroy_process_group()


Runner = Callable[[Group, str, float], Result]


def _ray_runner(nbytes: int, iters: int, fault: Optional[str]) -> Runner:
    def run(group: Group, backend: str, timeout_s: float) -> Result:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cls = ray.remote(_Peer)
        peers = [cls.options(num_cpus=0, num_gpus=1 if backend == "nccl" else 0, max_restarts=0,
                             scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                 for node in group.nodes]

        def failed(error: str, text: Optional[str] = None, limit_s: float = timeout_s) -> Result:
            """A failed check: a rank's error ``text``, else a hang past ``limit_s``."""
            return Result(group, backend, "failed", nbytes, error=error, cause=classify(
                text, timed_out=text is None, where=group.name, backend=backend, timeout_s=limit_s))

        try:
            ready, _ = ray.wait([peers[0].address.remote()], timeout=STARTUP_MARGIN_S)
            if not ready:
                return failed("the check's first rank did not start", limit_s=STARTUP_MARGIN_S)
            addr, port = ray.get(ready[0])
            refs = [p.all_reduce.remote(i, len(peers), addr, port, backend, nbytes, iters, timeout_s, fault)
                    for i, p in enumerate(peers)]
            # A rank that fails ends the check at once; a hang is cut at the timeout.
            deadline = time.monotonic() + timeout_s + STARTUP_MARGIN_S / 2
            pending = refs
            while pending and time.monotonic() < deadline:
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - the rank's error, classified below
                        text = str(getattr(e, "cause", None) or e)
                        return failed(text.strip()[-2000:], text)
            if pending:
                return failed(f"{len(pending)} of {len(refs)} rank(s) still inside the all-reduce")
            seconds = max(ray.get(r)["seconds"] for r in refs)
            return Result(group, backend, "ok", nbytes, seconds, bus_bandwidth(nbytes, seconds, len(refs)))
        finally:
            for p in peers:
                ray.kill(p)

    return run


def run_checks(placements: list[list[str]], *, use_gpu: bool, timeout_s: float, runner: Optional[Runner] = None,
               nbytes: Optional[int] = None, iters: int = 5, links: Optional[dict[str, str]] = None
               ) -> InterconnectReport:
    """Every check of ``groups(placements)``, one after the other (they may share GPUs); ``links``:
    each node's link class, whose floor its check within the node must reach."""
    backend = "nccl" if use_gpu else "gloo"
    nbytes = nbytes or (256 if use_gpu else 16) * 2**20  # enough to reach the link's bandwidth, quick on gloo
    runner = runner or _ray_runner(nbytes, iters, os.environ.get(FAULT_ENV) or None)
    report = InterconnectReport()
    for group in groups(placements):
        log.info("interconnect: %s all-reduce across %s (%d ranks)", backend, group.name, len(group.nodes))
        report.results.append(against_floor(runner(group, backend, timeout_s), (links or {}).get(group.nodes[0])))
    return report


def wanted(setting, *, use_gpu: bool, placements: list[list[str]]) -> bool:
    """``scaling.interconnect_check``: auto checks GPU plans and plans that span nodes."""
    if setting is False or not groups(placements):
        return False
    return setting is True or use_gpu or any(len(set(p)) > 1 for p in placements)


def check_plan(plan, *, setting, timeout_s: float, runner: Optional[Runner] = None,
               links: Optional[dict[str, str]] = None) -> Optional[InterconnectReport]:
    """The checks a plan wants (``scaling.interconnect_check``), GPU variants over NCCL and CPU
    variants over gloo; None when it wants none. ``links`` as for ``run_checks``."""
    report, ran = InterconnectReport(), False
    for use_gpu in (True, False):
        placements = [v.nodes for v in plan.runnable() if v.use_gpu == use_gpu]
        if wanted(setting, use_gpu=use_gpu, placements=placements):
            report.results += run_checks(placements, use_gpu=use_gpu, timeout_s=timeout_s, runner=runner,
                                         links=links).results
            ran = True
    return report if ran else None
