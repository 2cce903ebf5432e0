"""A real Ray cluster on this machine, started the way users start theirs: a head and a second
node with other labels via cluster/ray-node.sh, a training job via `ray job submit`, then
teardown of exactly the processes the script started.

Everything is on unique ports with its own temp dir, state dirs and auth token, so it neither
sees nor disturbs other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

SCRIPT = ROOT / "cluster" / "ray-node.sh"
JOB_TIMEOUT_S = 240


def free_ports(n: int, taken: set[int]) -> list[int]:
    """n distinct ports free right now and not in ``taken`` (Ray binds some on all interfaces, so
    check those). The chosen ports are added to ``taken``."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
            port = s.getsockname()[1]
            if port not in taken:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    taken.update(ports)
    return ports


def ephemeral_low() -> int:
    """The lowest port the OS picks for bind(0) (Ray's own unpinned components use those)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_range(width: int, taken: set[int]) -> int:
    """The first port of ``width`` consecutive free ports, none of them in ``taken``; they are added
    to it. Without ``taken`` a node's worker range could swallow a port the OS handed to another
    of its components a moment before (node_manager 48025 inside workers 47999-48038, CI 11-29)."""
    low, high = 20000, ephemeral_low() - width  # below the ports the OS hands out for bind(0)
    if high <= low:
        low, high = 20000, 60000
    for _ in range(200):
        base = low + secrets.randbelow(high - low)
        span = set(range(base, base + width))
        if span & taken:
            continue
        try:
            for p in span:
                with socket.socket() as s:
                    s.bind(("", p))
        except OSError:
            continue
        taken.update(span)
        return base
    raise RuntimeError("no free port range")


def node_args(ports: list[int], workers: int, temp_dir: Path) -> list[str]:
    nm, om, agent, agent_grpc, renv, metrics = ports
    return ["--node-ip-address=127.0.0.1", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={workers}", f"--max-worker-port={workers + 39}",
            f"--temp-dir={temp_dir}", "--num-cpus=1", "--object-store-memory=100000000"]


def sh(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def processes_under(temp_dir: Path) -> list[str]:
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(temp_dir) in cmd:
            found.append(f"{p.info['pid']}: {cmd[:120]}")
    return found


@pytest.fixture
def cluster(tmp_path):
    """Head + second node on loopback; yields (env, dashboard URL, GCS port, temp dirs)."""
    if shutil.which("ray") is None:
        pytest.skip("the `ray` CLI is not on PATH")
    tag = secrets.token_hex(3)
    temps = [Path(f"/tmp/rt-{tag}-h"), Path(f"/tmp/rt-{tag}-w")]  # short: Unix sockets live here
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0", "FO_START_TIMEOUT": "150", "FO_STOP_TIMEOUT": "30"}
    env.pop("RAY_ADDRESS", None)
    # conftest's loopback-only switch makes `ray start` refuse a second node; a real cluster needs it off.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.pop("RAY_AUTH_TOKEN", None)
    taken: set[int] = set()
    head_workers, second_workers = free_range(40, taken), free_range(40, taken)
    gcs, dash, client, *rest = free_ports(15, taken)
    head_env = {**env, "FO_STATE_DIR": str(tmp_path / "state-head")}
    # The second node's own environment switches flash attention off, as an admin would for a
    # node with a broken flash-attn: preflight must find that, and the planner act on it.
    worker_env = {**env, "FO_STATE_DIR": str(tmp_path / "state-worker"), "DISABLE_FLASH_ATTN": "1",
                  "FO_EXTRA_LABELS": "fo-flash-attn=broken,fo-test-node=second"}
    head_cmd = [str(SCRIPT), "head", f"--port={gcs}", f"--dashboard-port={dash}",
                f"--ray-client-server-port={client}", *node_args(rest[:6], head_workers, temps[0])]
    try:
        r = sh(head_cmd, head_env)
        assert r.returncode == 0, f"head did not start:\n{r.stdout}\n{r.stderr}"
        assert "head started" in r.stdout and f"http://127.0.0.1:{dash}" in r.stdout, r.stdout
        r = sh([str(SCRIPT), "join", f"127.0.0.1:{gcs}", *node_args(rest[6:12], second_workers, temps[1])], worker_env)
        assert r.returncode == 0, f"second node did not join:\n{r.stdout}\n{r.stderr}"
        yield {"env": env, "head_env": head_env, "worker_env": worker_env, "dashboard": f"http://127.0.0.1:{dash}",
               "gcs_port": gcs, "temps": temps, "head_cmd": head_cmd}
    finally:
        for e in (worker_env, head_env):
            sh([str(SCRIPT), "stop"], e, timeout=120)
        left = [p for t in temps for p in processes_under(t)]
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
        assert not left, f"processes left after stop: {left}"


def job_status(r: subprocess.CompletedProcess) -> str | None:
    """The status `ray job status` printed: "Job 'x' succeeded", "... failed", "... was stopped",
    or "Status for job 'x': RUNNING"."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
    m = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", text)
    if m:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
    m = re.search(r"Status for job '[^']+': (\w+)", text)
    return m.group(1) if m else None


def node_labels(cluster) -> list[dict]:
    code = ("import json; from ray.util.state import list_nodes; "
            f"print(json.dumps([n.labels for n in list_nodes(address={cluster['dashboard']!r}, detail=True) "
            "if n.state == 'ALIVE']))")
    r = sh([sys.executable, "-c", code], cluster["env"], timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_job_submitted_to_a_two_node_cluster_trains_both_variants_where_preflight_allows(cluster, tmp_path):
    """`ray job submit` of `train --run-both-models` to a head and a second node whose
    environment disables flash attention: the variants run at once, flash on the head."""
    env, dash = cluster["env"], cluster["dashboard"]

    # Starting the head again is a no-op that says so.
    again = sh(cluster["head_cmd"], cluster["head_env"])
    assert again.returncode == 0 and "head already running" in again.stdout, again.stdout + again.stderr

    labels = node_labels(cluster)
    assert len(labels) == 2
    (second,) = [l for l in labels if l.get("fo-test-node") == "second"]
    (head,) = [l for l in labels if l.get("fo-test-node") != "second"]
    assert second["fo-flash-attn"] == "broken"  # FO_EXTRA_LABELS overrides the computed value
    assert head["fo-flash-attn"] in ("ok", "import-only", "missing", "broken")
    for l in labels:
        assert {"fo-accelerator", "fo-glibc", "fo-gpu-count", "fo-cuda-cc"} <= set(l)
        assert l["fo-glibc"] == head["fo-glibc"]  # same machine, same computed facts

    cfg = write_config(tmp_path / "tiny.yaml", {"scaling": {"num_workers": 1},
                                               "train": {"max_steps": 4, "checkpoint_every": 2}})
    out = tmp_path / "runs"
    job = f"fo-test-{secrets.token_hex(3)}"
    submit = ["ray", "job", "submit", "--address", dash, "--submission-id", job, "--no-wait",
              "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": ["runs/", ".git", "preflight.json", "flash_attention_log.txt"]}),
              "--", "python", "-m", "orchestrator", "train", "--config-file", str(cfg),
              "--output-dir", str(out), "--name", "on-cluster", "--run-both-models"]
    r = sh(submit, env)
    assert r.returncode == 0, r.stdout + r.stderr

    deadline, status = time.time() + JOB_TIMEOUT_S, None
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(3)
        status = job_status(sh(["ray", "job", "status", "--address", dash, job], env, timeout=60))
    logs = sh(["ray", "job", "logs", "--address", dash, job], env, timeout=60).stdout
    assert status == "SUCCEEDED", f"job ended {status or 'not within the timeout'}; its log:\n{logs[-4000:]}"

    assert "joining Ray cluster at" in logs and f":{cluster['gcs_port']}" in logs  # it used the cluster it ran in
    assert "storage: all 2 nodes see" in logs
    summary = json.loads((out / "on-cluster" / "summary.json").read_text())
    assert summary["run"]["status"] == "succeeded"
    assert summary["run"]["ray_address"].endswith(f":{cluster['gcs_port']}")
    assert summary["run"]["mode"] == "concurrent"
    preflight = json.loads((out / "on-cluster" / "preflight.json").read_text())
    node_of = {("second" if n["labels"].get("fo-test-node") == "second" else "head"): n for n in preflight["nodes"]}
    assert node_of["second"]["verdict"]["reason"] == "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"
    assert node_of["head"]["verdict"]["flash_kernel"] == "sdpa_flash_cpu"
    flash, standard = summary["variants"]["flash"], summary["variants"]["standard"]
    for v in (flash, standard):
        assert v["status"] == "succeeded" and v["steps"] == 4 and v["num_workers"] == 1
    assert [w["node_id"] for w in flash["workers"]] == [node_of["head"]["node_id"]]
    assert [w["node_id"] for w in standard["workers"]] == [node_of["second"]["node_id"]]
    assert (flash["backend"], flash["env"]) == ("sdpa_flash_cpu", {"ATTN_IMPL": "flash"})
    assert standard["env"] == {"ATTN_IMPL": "standard", "DISABLE_FLASH_ATTN": "1"}
    assert flash["first_loss"] == pytest.approx(standard["first_loss"], rel=1e-5)  # same seed, same weights
