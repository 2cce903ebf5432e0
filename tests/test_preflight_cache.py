"""The per-node preflight cache: reused while nothing changed, probed again after every kind of
change, never corrupted by concurrent runs, ignored when unreadable; and the worker that reuses
its node's verdict, and falls back when that verdict is wrong."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestrator.preflight.child import probe_command, probe_env, run_probe
from orchestrator.preflight.settings import ProbeSettings
from orchestrator.preflight.node import probe_or_reuse
from orchestrator.preflight.findings import LOG_FILE, NodeReport
from orchestrator.preflight.rules import verdict
from tests.preflight_fakes import IMPORT_ERRORS, fake_flash_attn, import_failing
from trainer import attention
from trainer.attention import AttentionShape, cache

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ProbeSettings(shape=AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2), timeout_s=120)


@pytest.fixture(scope="module")
def real_probe_output() -> str:
    """One real probe of this machine; the tests' probe command replays its output."""
    # This checkout first on PYTHONPATH, the installed packages still visible (probe_env prepends).
    raw = run_probe(probe_command(SETTINGS), SETTINGS.timeout_s, probe_env(False))
    assert raw["returncode"] == 0, raw["stderr"]
    return raw["stdout"]


@pytest.fixture
def node(tmp_path, real_probe_output, monkeypatch):
    """A node whose cache is in tmp_path, whose probe replays the real one and counts its runs,
    and whose PYTHONPATH holds an (empty for now) site directory to plant packages in."""
    site = tmp_path / "site"
    site.mkdir()
    (tmp_path / "facts.txt").write_text(real_probe_output)
    runs = tmp_path / "runs.txt"
    argv = [sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write('x'); print(open(sys.argv[2]).read())",
            str(runs), str(tmp_path / "facts.txt")]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
           cache.CACHE_DIR_ENV: str(tmp_path / "cache")}

    class Node:
        def __init__(self):
            self.site, self.env = site, env

        def probe(self, settings=SETTINGS, fresh=False) -> dict:
            return probe_or_reuse(argv, settings, fresh, self.env)

        @property
        def probes(self) -> int:
            return len(runs.read_text()) if runs.exists() else 0

    return Node()


def test_an_unchanged_node_reuses_its_result_and_says_so(node):
    first = node.probe()
    second = node.probe()
    assert node.probes == 1
    assert first["cache"]["reused"] is False and second["cache"]["reused"] is True
    cached, reused = (json.loads(r["stdout"].split(" ", 1)[1]) for r in (first, second))
    assert dict(reused, health=None) == dict(cached, health=None)  # the node's health alone is read again
    report = NodeReport(node_id="n" * 16, address="127.0.0.1", cpus=2, gpus=0, labels={}, facts=None,
                        verdict=verdict(json.loads(second["stdout"].split(" ", 1)[1])), cache=second["cache"])
    assert report.row()[8] == "reused"


def test_a_flash_attn_install_planted_between_runs_is_probed_again(node):
    node.probe()
    fake_flash_attn(node.site, import_failing(IMPORT_ERRORS["glibc_too_old"]))
    again = node.probe()
    assert node.probes == 2 and again["cache"]["reused"] is False
    assert node.probe()["cache"]["reused"] is True  # and the new state is cached in turn


def test_a_changed_flash_attn_so_file_is_probed_again(node):
    fake_flash_attn(node.site, import_failing(IMPORT_ERRORS["glibc_too_old"]), with_so=True)
    node.probe()
    so = next(node.site.glob("*.so"))
    so.write_bytes(so.read_bytes() + b"\0")  # a rebuilt extension, same version string
    assert node.probe()["cache"]["reused"] is False
    assert node.probes == 2


def test_a_different_torch_version_is_probed_again(node):
    node.probe()
    info = node.site / "torch-9.9.9.dist-info"  # found before the real torch on this node's path
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 9.9.9\n")
    assert node.probe()["cache"]["reused"] is False
    assert node.probes == 2


def test_the_disable_switch_is_probed_again_whether_set_by_flag_or_by_the_nodes_environment(node):
    node.probe()
    node.env["DISABLE_FLASH_ATTN"] = "1"  # the node's own switch
    assert node.probe()["cache"]["reused"] is False
    assert node.probes == 2
    del node.env["DISABLE_FLASH_ATTN"]
    assert node.probe()["cache"]["reused"] is True  # switched back: the first result holds again
    # --disable-flash-attn makes the probe see exactly what the node's switch does: one state.
    assert node.probe(replace(SETTINGS, disable_flash_attn=True))["cache"]["reused"] is True
    assert node.probes == 2


def test_a_different_check_shape_is_probed_again(node):
    node.probe()
    node.probe(replace(SETTINGS, shape=replace(SETTINGS.shape, head_dim=32)))
    assert node.probes == 2


def test_fresh_preflight_probes_again_and_refreshes_the_cache(node):
    node.probe()
    fresh = node.probe(fresh=True)
    assert node.probes == 2
    assert fresh["cache"] == {"reused": False, "path": fresh["cache"]["path"], "why_not": "--fresh-preflight"}
    assert node.probe()["cache"]["reused"] is True


def test_a_failed_probe_is_not_cached(node, tmp_path):
    broken = probe_or_reuse([sys.executable, "-c", "raise SystemExit(3)"], SETTINGS, False, node.env)
    assert broken["returncode"] == 3 and not broken["cache"]["reused"]
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(node, caplog):
    first = node.probe()
    Path(first["cache"]["path"]).write_text('{"format": 1, "raw": {"stdout": "trunc')
    with caplog.at_level(logging.WARNING, logger="trainer.attention.cache"):
        again = node.probe()
    assert again["cache"]["reused"] is False and node.probes == 2
    assert "corrupt" in caplog.text and first["cache"]["path"] in caplog.text
    assert node.probe()["cache"]["reused"] is True


def test_garbage_bytes_in_a_cache_entry_are_ignored_with_a_warning_not_a_probe_failure(node, caplog):
    first = node.probe()
    Path(first["cache"]["path"]).write_bytes(b"\xff\xfe\x00garbage\x9c")
    with caplog.at_level(logging.WARNING, logger="trainer.attention.cache"):
        again = node.probe()
    assert again["cache"]["reused"] is False and node.probes == 2 and again["returncode"] == 0
    assert "corrupt" in caplog.text and first["cache"]["path"] in caplog.text
    assert node.probe()["cache"]["reused"] is True


def test_an_unreadable_cache_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "entry.json"
    path.mkdir()  # reading a directory fails with an OSError, as a bad mount would
    with caplog.at_level(logging.WARNING, logger="trainer.attention.cache"):
        found = cache.load(path)
    assert found.entry is None and "unreadable" in found.why_not and "unreadable" in caplog.text


def _hammer(path: str, n: int, tag: int) -> None:
    key = {"writer": tag}
    for i in range(n):
        cache.store(Path(path), key, {"stdout": "x" * (1000 * (tag + 1)), "i": i}, {"flash_ok": True})
        found = cache.load(Path(path))
        if found.entry is None or len(found.entry["raw"]["stdout"]) not in (1000, 2000):
            raise SystemExit(f"writer {tag} read a broken entry at {i}: {found.why_not}")


def test_two_concurrent_writers_never_leave_a_broken_entry(tmp_path):
    path = tmp_path / "node" / "key.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(path), 300, tag)) for tag in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert cache.load(path).entry is not None
    assert [f.name for f in path.parent.iterdir()] == ["key.json"]  # no temp files left behind


# ---------------------------------------------------------------- the worker's re-check


def _plant_verdict(kernel: str, shape: AttentionShape, timings: dict | None = None) -> Path:
    path = cache.path_for(shape, False)
    cache.store(path, cache.node_key(shape, False), {"stdout": ""},
                {"flash_ok": True, "flash_kernel": kernel, "kernel_timings": timings or {}})
    return path


WORKER_SHAPE = AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2, dtype="auto")
CPU = torch.device("cpu")


def _worker(tmp_path, shape=WORKER_SHAPE, device=CPU):
    """As a worker chooses: the node's verdict where it holds."""
    resolved = attention.choose("flash", shape, device, log_dir=tmp_path)
    return resolved, resolved.verdict


def _afresh(shape=WORKER_SHAPE):
    return attention.choose("flash", shape, CPU, reuse_verdict=False, time_kernels=False)


def test_a_worker_reuses_its_nodes_verdict(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    _plant_verdict("sdpa_flash_cpu", WORKER_SHAPE, timings={"sdpa_flash_cpu": 1.5, "sdpa_math": 2.5})
    resolved, reuse = _worker(tmp_path)
    assert resolved.kernel == "sdpa_flash_cpu" and reuse["reused"] is True
    # The record's kernel_timings: what the preflight chose from, carried with the reused verdict.
    assert resolved.timings == {"sdpa_flash_cpu": 1.5, "sdpa_math": 2.5}


def test_a_worker_without_a_cached_verdict_chooses_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    resolved, reuse = _worker(tmp_path)
    assert resolved.kernel == _afresh().kernel
    assert reuse == {"reused": False, "why_not": "no cached result for this node's current state"}


def test_a_wrong_reused_verdict_falls_back_marks_the_entry_stale_and_is_logged(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    # The cache says flash_attn_2 passed here; on this worker its import fails.
    path = _plant_verdict("flash_attn_2", WORKER_SHAPE)
    resolved, reuse = _worker(tmp_path)
    fresh = _afresh()
    assert (resolved.kernel, resolved.rejected) == (fresh.kernel, fresh.rejected)
    assert reuse["reused"] is False and "flash_attn_2 was wrong" in reuse["why_not"]
    assert "marked stale" in cache.load(path).why_not
    logged = (tmp_path / LOG_FILE).read_text()
    assert "reused preflight verdict (kernel flash_attn_2" in logged and f"chose afresh: {fresh.kernel}" in logged
    # The next worker finds no verdict to reuse: it chooses afresh too, without a new log line.
    _, again = _worker(tmp_path)
    assert again["reused"] is False and "stale" in again["why_not"]
    assert (tmp_path / LOG_FILE).read_text() == logged


# ---------------------------------------------------------------- through Ray


@pytest.mark.ray
def test_preflight_on_a_ray_node_is_reused_until_fresh_preflight_is_asked(ray_session):
    from orchestrator.preflight import run_preflight

    settings = ProbeSettings(shape=AttentionShape(head_dim=8, n_heads=2, n_kv_heads=1), timeout_s=120)  # a shape no other test uses
    first, second, fresh = (run_preflight(settings, fresh=f) for f in (False, False, True))
    assert [n.reused for r in (first, second, fresh) for n in r.nodes] == [False, True, False]
    assert second.nodes[0].verdict.flash_kernel == first.nodes[0].verdict.flash_kernel
    assert "reused" in second.table()[2] and any("reused their cached result" in l for l in second.table())
    assert "preflight result reused from" in second.log_text()


@pytest.mark.ray
def test_a_run_whose_reused_verdict_is_wrong_still_trains_logs_it_and_leaves_the_entry_stale(ray_session, tmp_path):
    from orchestrator.run import TrainOptions, train
    from tests.conftest import write_config

    cfg = str(write_config(tmp_path / "c.yaml", {"train": {"max_steps": 2, "checkpoint_every": 2}}))
    first = train(TrainOptions(config_file=cfg, output_dir=str(tmp_path / "runs"), name="first")).model_dump()
    [entry_path] = {w["preflight_verdict"]["path"] for w in first["variants"]["flash"]["workers"]}
    entry = cache.load(Path(entry_path)).entry
    # The node's verdict names a kernel that no longer works here (say flash-attn broke in a way
    # the key cannot see); its facts still hold, so preflight reuses the entry as it is.
    cache.store(Path(entry_path), entry["key"], entry["raw"], {"flash_ok": True, "flash_kernel": "flash_attn_2"})
    second = train(TrainOptions(config_file=cfg, output_dir=str(tmp_path / "runs"), name="second")).model_dump()
    rec = second["variants"]["flash"]
    assert rec["status"] == "succeeded" and rec["backend"] == first["variants"]["flash"]["backend"]
    # The first worker to try the verdict finds it wrong and marks it stale; a sibling on the
    # same node that reads the entry after that sees the mark instead. Neither reuses it.
    verdicts = [w["preflight_verdict"] for w in rec["workers"]]
    assert not any(v["reused"] for v in verdicts), verdicts
    assert any("verdict flash_attn_2 was wrong" in v["why_not"] for v in verdicts), verdicts
    assert all("verdict flash_attn_2 was wrong" in v["why_not"] or "kernel flash_attn_2 failed in a worker"
               in v["why_not"] for v in verdicts), verdicts
    log_text = (tmp_path / "runs" / "second" / LOG_FILE).read_text()
    assert "the reused preflight verdict (kernel flash_attn_2" in log_text and "cache entry marked stale" in log_text
    assert "marked stale" in cache.load(Path(entry_path)).why_not


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_real_probe_verdict_is_reused_by_the_worker_and_skips_the_other_candidates(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    settings = ProbeSettings(shape=AttentionShape(head_dim=64, n_heads=8, n_kv_heads=2, dtype="auto"), timeout_s=300)
    # The parent's own environment: probe_env prepends this checkout to PYTHONPATH, so the child sees
    # the packages the worker below sees (flash-attn-4 installed beside them included).
    raw = probe_or_reuse(probe_command(settings), settings, False, dict(os.environ))
    assert raw["cache"]["reused"] is False
    resolved, reuse = _worker(tmp_path, settings.shape, torch.device("cuda", 0))
    assert reuse["reused"] is True, reuse
    verdict_kernel = cache.load(Path(raw["cache"]["path"])).entry["verdict"]["flash_kernel"]
    assert resolved.kernel == verdict_kernel and resolved.rejected == {}


def test_a_verdict_of_standard_timed_fastest_is_reused_but_not_one_without_its_timing(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = _plant_verdict("standard", WORKER_SHAPE, timings={"sdpa_flash_cpu": 2.0, "standard": 1.2})
    resolved, reuse = _worker(tmp_path)
    assert (resolved.kernel, reuse["reused"]) == ("standard", True)
    assert resolved.fn is attention.standard_attention

    # "standard" with nothing timed is no choice preflight made: the worker chooses afresh.
    cache.store(path, cache.node_key(WORKER_SHAPE, False), {"stdout": ""}, {"flash_ok": True, "flash_kernel": "standard"})
    resolved, reuse = _worker(tmp_path)
    assert reuse["reused"] is False and "not a flash candidate" in reuse["why_not"]
    assert resolved.kernel == _afresh().kernel
