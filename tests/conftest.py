"""Shared fixtures. One Ray session serves every test that needs Ray (starting one costs ~10 s)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# Every Ray the tests start (local, simulated multi-node, the CLI's) binds to 127.0.0.1 only;
# Ray reads this when it is first imported, which happens after conftest.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Preflight results and compiled code are cached per user; the tests' go to a directory of
# their own (the Ray they start inherits it), never into the user's ~/.cache.
_TEST_CACHE = tempfile.TemporaryDirectory(prefix="fo-test-cache-")
os.environ.setdefault("FLASH_ORCHESTRATOR_PREFLIGHT_CACHE", os.path.join(_TEST_CACHE.name, "preflight"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TEST_CACHE.name, "inductor"))

# A config small enough that a two-worker CPU run takes seconds.
TINY = {
    "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
    "train": {"seq_len": 32, "micro_batch_size": 4, "max_steps": 6, "checkpoint_every": 3,
              "warmup_steps": 2, "lr": 3e-3, "min_lr": 3e-4},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2},
}


# Ray Train's controller polls workers every 2 s, and a worker's second report waits for that
# poll (its result queue holds one): each checkpoint of a tiny run would cost ~2 s. The driver
# passes this to the controller it starts.
FAST_RAY_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3"}


def write_config(path: Path, overrides: dict | None = None) -> Path:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path.write_text(yaml.safe_dump(cfg))
    return path


WORKER_RUNTIME_ENV = {"env_vars": {"PYTHONPATH": str(ROOT)}}


def init_local_ray():
    """The session's local Ray (4 logical CPUs so two 2-worker variants fit)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(FAST_RAY_TRAIN)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=WORKER_RUNTIME_ENV)
    return ray


@contextmanager
def simulated_cluster(*nodes: dict, shutdown_at_exit: bool = True):
    """A ray.cluster_utils.Cluster on 127.0.0.1, a CPU-less head and ``nodes`` (each add_node's
    arguments), with this process connected; yields the cluster and the nodes. The session's
    local Ray, if it was up, is back afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    # A private Ray temp dir: Cluster records its address there, and a bare ray.init() by
    # anything else on this machine must not find and join this cluster.
    tmp = tempfile.mkdtemp(prefix="raycluster-", dir="/tmp")
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a node starting on a busy machine registers late
    local = {"node_ip_address": "127.0.0.1"}
    c = Cluster(initialize_head=True, shutdown_at_exit=shutdown_at_exit,
                head_node_args={"num_cpus": 0, "include_dashboard": False, **local})
    added = [c.add_node(**local, **n) for n in nodes]
    ray.init(address=c.address, log_to_driver=False, runtime_env=WORKER_RUNTIME_ENV)
    try:
        yield c, added
    finally:
        ray.shutdown()
        c.shutdown()
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
        shutil.rmtree(tmp, ignore_errors=True)
        if was_up:
            init_local_ray()


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session. A module that needs another cluster (see
    test_variants_ray.py) shuts it down and calls init_local_ray() again when done."""
    import ray

    from orchestrator.session import remove_session_dir

    yield init_local_ray()
    ray.shutdown(wait_for_processes=True)
    # Leave /tmp/ray as we found it, as the CLI does: Ray names a session after its start time
    # and the pid of the process that started it, so these are the sessions this process started.
    born = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(psutil.Process().create_time() - 1))
    for d in (Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray").glob(f"session_*_{os.getpid()}"):
        if d.name[len("session_"):len("session_") + len(born)] >= born:
            remove_session_dir(d)


SLOW_FIXTURES = ("ray_session", "cli_env")


def pytest_runtest_setup(item):
    """The fast loop (``-m "not ray and not gpu"``) must stay fast: a test that starts Ray or
    runs the CLI in a subprocess without the ``ray`` marker fails here, naming the marker."""
    slow = [f for f in SLOW_FIXTURES if f in item.fixturenames]
    if slow and item.get_closest_marker("ray") is None:
        pytest.fail(f"{item.nodeid} uses {', '.join(slow)}: mark it @pytest.mark.ray", pytrace=False)


@pytest.fixture
def cli_env():
    """Environment for running the CLI in a subprocess from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(FAST_RAY_TRAIN)
    return env


def run_cli(args: list[str], env: dict, cwd: Path, timeout: float = 300):
    import subprocess

    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _restore_cli_logging():
    """A test that calls ``cli.main`` in-process gets the CLI's stdout handlers with propagation
    off; put the loggers back, so later tests' ``caplog`` still sees their records."""
    import logging

    saved = {n: (lg.handlers[:], lg.propagate, lg.level)
             for n in ("orchestrator", "trainer") for lg in [logging.getLogger(n)]}
    yield
    for name, (handlers, propagate, level) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level


def committed_checkpoint(storage) -> str | None:
    """The name of the latest checkpoint Ray Train registered (what --resume restores), or None."""
    from trainer import checkpoint

    try:
        return checkpoint.as_store(storage).snapshot()["latest_checkpoint_result"]["checkpoint_dir_name"] or None
    except (KeyError, TypeError):
        return None


@pytest.fixture
def probe_cache_restored():
    """For a test that fakes a node's install in the probe's command line only: the node's cache
    key, made from the node's environment, cannot see the fake, so the fake's verdict would be
    reused by every later test of that shape (a flash run then trained standard attention). The
    test cache is put back as it was afterwards."""
    root = Path(os.environ["FLASH_ORCHESTRATOR_PREFLIGHT_CACHE"])
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} if root.exists() else {}
    yield
    for p in [p for p in root.rglob("*") if p.is_file()] if root.exists() else []:
        if p not in before:
            p.unlink(missing_ok=True)
    for p, data in before.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
