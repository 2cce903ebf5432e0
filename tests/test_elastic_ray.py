"""Elastic runs and hangs on a simulated two-node cluster (ray.cluster_utils.Cluster, all on
127.0.0.1): a CPU-less head and two nodes of one CPU, one worker each.

A node lost mid-run: the run goes on with the worker left, from its last checkpoint, and
grows back to two when a node joins. A worker frozen with SIGSTOP: Ray Train's health check
finds it after half of scaling.hang_timeout_s, the failure names its rank, and the group
restarts from its last checkpoint. The tests act on what the run writes as it goes
(metrics.jsonl, attempts.jsonl), as a user watching it would.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from orchestrator.run import TrainOptions, train
from tests.conftest import simulated_cluster, write_config
from trainer import checkpoint
from trainer.metrics import ATTEMPTS_FILE, METRICS_FILE

pytestmark = pytest.mark.ray

ONE_CPU = {"num_cpus": 1}


@pytest.fixture
def cluster():
    # shutdown_at_exit=False: a node is added from a thread, where Ray may not set signal handlers.
    with simulated_cluster(ONE_CPU, ONE_CPU, shutdown_at_exit=False) as (c, _):
        yield c


def nodes():
    import ray

    from orchestrator.plan import NodeCapacity

    return [NodeCapacity(node_id=n["NodeID"], cpus=n["Resources"].get("CPU", 0.0), gpus=0.0)
            for n in ray.nodes() if n.get("Alive")]


def lines(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def starts(vdir: Path) -> list[dict]:
    return [a for a in lines(vdir / ATTEMPTS_FILE) if "start_step" in a]


def wait_for(what, check, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Chaos(threading.Thread):
    """Acts on a run in the background while train() runs in the test's thread; an error
    here is raised in the test when it ends."""

    def __init__(self, act):
        super().__init__(daemon=True)
        self.act, self.error = act, None

    def run(self):
        try:
            self.act()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def finish(self):
        self.join(timeout=60)
        if self.error:
            raise self.error


def _train(tmp_path, name, overrides):
    cfg = write_config(tmp_path / f"{name}.yaml", overrides)
    return train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name), nodes=nodes)


def test_a_lost_node_shrinks_the_run_to_its_last_checkpoint_and_a_joining_node_grows_it(cluster, tmp_path,
                                                                                         monkeypatch):
    # A checkpoint's report waits for the controller's next poll: once a second, a checkpoint
    # every 3 steps paces the run (~0.4 s a step), so the one-worker group is still training
    # when Ray's view of the cluster (refreshed every 20 s) sees the node that joined: here it
    # grew back at step 75 (28 s after the node joined; 2026-12-07, 2-core CPU).
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    steps = 180
    vdir = tmp_path / "runs" / "elastic" / "flash"
    lost = cluster.list_all_nodes()[-1]
    joined: dict = {}

    def act():
        wait_for("two workers at step 6", lambda: starts(vdir) and
                 any(m["step"] >= 6 for m in lines(vdir / METRICS_FILE)))
        cluster.remove_node(lost)
        one = wait_for("a one-worker attempt", lambda: [a for a in starts(vdir) if a["world_size"] == 1])[0]
        wait_for("a step of the one-worker attempt",
                 lambda: any(m["step"] > one["start_step"] for m in lines(vdir / METRICS_FILE)))
        cluster.add_node(node_ip_address="127.0.0.1", **ONE_CPU)
        joined["at"] = time.time()

    chaos = Chaos(act)
    chaos.start()
    summary = _train(tmp_path, "elastic", {
        "train": {"max_steps": steps, "checkpoint_every": 3},
        "scaling": {"num_workers": [1, 2], "resize_interval_s": 2, "placement_timeout_s": 20, "max_failures": 3}})
    chaos.finish()
    rec = summary.variants["flash"]
    assert rec.status == "succeeded", rec.error
    worlds = [a["world_size"] for a in starts(vdir)]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    grown = starts(vdir)[-1]
    print(f"\nworker counts by attempt: {worlds}; grown back at step {grown['start_step']}, "
          f"{grown['time'] - joined['at']:.0f} s after the node joined")
    failures = [a for a in lines(vdir / ATTEMPTS_FILE) if "failed_ranks" in a]
    assert failures, "the lost worker's failure is not recorded"
    shrunk = next(a for a in starts(vdir) if a["world_size"] == 1)
    assert shrunk["start_step"] % 3 == 0 and shrunk["restored_from"].endswith(f"{shrunk['start_step']:08d}")
    logged = [m["step"] for m in lines(vdir / METRICS_FILE)]
    assert logged == list(range(1, steps + 1))  # every step once, none lost or doubled by the resizes
    by_step = {m["step"]: m for m in lines(vdir / METRICS_FILE)}
    # Per step, the tokens of the workers that took it: 4 x 32 for one, twice that for two.
    tokens = [by_step[s + 1]["tokens"] - by_step[s]["tokens"] for s in range(1, steps)]
    assert set(tokens) == {4 * 32, 2 * 4 * 32}
    assert by_step[steps]["tokens"] == sum(tokens) + by_step[1]["tokens"]


def test_a_worker_frozen_with_sigstop_is_named_and_its_group_restarts_within_the_hang_timeout(cluster, tmp_path):
    hang_timeout_s = 60
    vdir = tmp_path / "runs" / "hang" / "flash"
    stopped: dict = {}

    def saved_since(start_step: int) -> bool:
        """Whether a checkpoint after ``start_step`` is complete: one still being written when
        a rank stops is lost with it (its manifest never comes), and the group restarts before it."""
        found = checkpoint.newest_usable(vdir / checkpoint.STORAGE_NAME)
        return found is not None and int(found.name.removeprefix("checkpoint_")) > start_step

    def stepping():
        latest = starts(vdir)[-1] if starts(vdir) else None
        steps = [m["step"] for m in lines(vdir / METRICS_FILE)]
        return (latest if latest and steps and steps[-1] >= latest["start_step"] + 4
                and saved_since(latest["start_step"]) else None)

    def act():
        group = wait_for("a group four steps in, a checkpoint complete", stepping)
        stopped["pid"], stopped["at"] = group["pids"][1], time.time()
        os.kill(stopped["pid"], signal.SIGSTOP)
        stopped["restart"] = wait_for("the next group", lambda: [a for a in starts(vdir) if a["time"] > stopped["at"]],
                                      timeout_s=4 * hang_timeout_s)[0]

    chaos = Chaos(act)
    chaos.start()
    try:
        summary = _train(tmp_path, "hang", {"train": {"max_steps": 60, "checkpoint_every": 3},
                                            "scaling": {"hang_timeout_s": hang_timeout_s}})
        chaos.finish()
    finally:
        if "pid" in stopped:  # the frozen worker, should Ray not have ended it
            try:
                os.kill(stopped["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    rec = summary.variants["flash"]
    assert rec.status == "succeeded", rec.error
    failure = next(a for a in lines(vdir / ATTEMPTS_FILE) if "failed_ranks" in a and a["time"] > stopped["at"])
    assert list(failure["failed_ranks"]) == ["1"] and "health check" in failure["failed_ranks"]["1"]
    detected_s = failure["time"] - stopped["at"]
    restarted_s = stopped["restart"]["time"] - stopped["at"]
    print(f"\nfrozen rank 1 found after {detected_s:.1f} s, its group restarted after {restarted_s:.1f} s "
          f"(hang_timeout_s {hang_timeout_s})")
    assert hang_timeout_s / 2 <= detected_s <= hang_timeout_s
    assert stopped["restart"]["start_step"] % 3 == 0 and stopped["restart"]["start_step"] > 0
    assert [m["step"] for m in lines(vdir / METRICS_FILE)] == list(range(1, 61))
