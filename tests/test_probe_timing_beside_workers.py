"""The local probe's kernel timing off the critical path: the plan goes on at the probe's facts
(printed before the kernels are timed), the timing finishes beside the workers' start, and a
worker of this node waits for its choice instead of timing the kernels again."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator.preflight import fanout
from orchestrator.preflight.child import parse_probe, run_probe
from orchestrator.preflight.findings import NodeReport, PreflightReport
from orchestrator.preflight.node import probe_or_reuse
from orchestrator.preflight.probe import DEFERRED, MARKER, SCHEMA
from orchestrator.preflight.rules import verdict
from orchestrator.preflight.settings import ProbeSettings
from trainer import attention
from trainer.attention import AttentionShape, cache, choice, kernels

SETTINGS = ProbeSettings(shape=AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2), timeout_s=60)
TIMINGS = {"sdpa_cudnn": 4.9, "sdpa_flash": 5.3}


def _facts(selection: dict) -> dict:
    return {"schema": SCHEMA, "hostname": "node-a", "torch": {"version": "2.x", "cuda_available": True},
            "gpus": [{"index": 0, "name": "H200", "capability": "9.0", "memory_bytes": 1}],
            "flash_attn": {"disabled": False, "distributions": [], "imports": []},
            "kernels": {"sdpa_flash": {"ok": True}, "sdpa_cudnn": {"ok": True}}, "kernel_selection": selection}


def _fake_probe(tmp_path: Path, *, hold_s: float, final: bool = True) -> list[str]:
    """A probe command that prints its facts before 'timing' (``hold_s``), then complete."""
    early = MARKER + json.dumps(_facts(DEFERRED))
    done = MARKER + json.dumps(_facts({"kernel": "sdpa_cudnn", "timings": TIMINGS}))
    script = tmp_path / "probe.py"
    script.write_text("import sys, time\n"
                      f"print({early!r}, flush=True)\n"
                      f"time.sleep({hold_s})\n"
                      + (f"print({done!r}, flush=True)\n" if final else ""))
    return [sys.executable, str(script)]


@pytest.fixture(autouse=True)
def _cache_here(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))


# ---------------------------------------------------------------- the probe's two lines


def test_a_verdict_made_before_the_timing_says_so_and_names_no_timed_kernel():
    v = verdict(_facts(DEFERRED))
    assert v.flash_ok and v.timing_pending and v.kernel_timings == {}
    done = verdict(_facts({"kernel": "sdpa_cudnn", "timings": TIMINGS}))
    assert (done.flash_kernel, done.timing_pending, done.kernel_timings) == ("sdpa_cudnn", False, TIMINGS)


def test_the_table_the_startup_line_and_the_log_say_the_kernels_are_timed_while_workers_start(tmp_path):
    node = NodeReport("abcdef0123", "127.0.0.1", 16, 1, {}, _facts(DEFERRED), verdict(_facts(DEFERRED)))
    report = PreflightReport([node], SETTINGS)
    assert "flash (kernels timed while workers start)" in "\n".join(report.table())
    assert report.outcome_lines() == ["Flash attention: the kernel timed fastest at the run's shape (timing while "
                                      "the workers start) on abcdef01 (127.0.0.1)"]
    assert "being timed at the run's shape while the workers start" in report.log_text()
    json_path, _ = report.write(tmp_path)
    assert json.loads(json_path.read_text())["nodes"][0]["verdict"]["timing_pending"] is True

    # Once the timing ended: preflight.json holds the complete facts, and the log's line says what won.
    node.probe_seconds, node.cache = 9.0, {"reused": False, "timing": "under way"}
    line = report.complete_timing("abcdef0123", _facts({"kernel": "sdpa_cudnn", "timings": TIMINGS}),
                                  verdict(_facts({"kernel": "sdpa_cudnn", "timings": TIMINGS})), 21.5)
    assert line == ("node abcdef0123: kernel timing ended after the plan: kernel sdpa_cudnn (4.9 ms/iter), "
                    "runner-up sdpa_flash (5.3 ms)")
    report.write_json(tmp_path)
    saved_node = json.loads(json_path.read_text())["nodes"][0]
    saved = saved_node["verdict"]
    assert (saved["flash_kernel"], saved["timing_pending"], saved["kernel_timings"]) == ("sdpa_cudnn", False, TIMINGS)
    # The probe's whole time, and the part the plan waited for.
    assert saved_node["probe_seconds"] == 21.5
    assert saved_node["cache"] == {"reused": False, "timing": "ended after the plan", "plan_seconds": 9.0}
    assert report.complete_timing("abcdef0123", {}, verdict(_facts(DEFERRED))) is None  # no longer pending


def test_run_probe_hands_over_each_facts_line_as_it_is_printed(tmp_path):
    seen: list[float] = []
    started = time.monotonic()
    raw = run_probe(_fake_probe(tmp_path, hold_s=1.5), 30, on_facts=lambda line: seen.append(time.monotonic()))
    assert raw["returncode"] == 0 and len(seen) == 2
    assert seen[0] - started < 1.2 <= seen[1] - started  # the first line came before the 'timing' ended
    facts, issue = parse_probe(raw, 30)
    assert issue is None and facts["kernel_selection"]["kernel"] == "sdpa_cudnn"  # the last line is the result


def test_a_probe_that_hangs_while_timing_is_still_stopped_at_its_timeout(tmp_path):
    seen = []
    raw = run_probe(_fake_probe(tmp_path, hold_s=30), 1.0, on_facts=seen.append)
    assert raw["timed_out"] and len(seen) == 1 and raw["seconds"] < 10
    facts, issue = parse_probe(raw, 1.0)
    assert facts is None and issue.cause.code == "hang"


# ---------------------------------------------------------------- the node: early answer, then the cache


def test_the_node_answers_at_the_facts_and_caches_the_timed_choice_when_the_timing_ends(tmp_path):
    argv = _fake_probe(tmp_path, hold_s=1.5)
    path = cache.path_for(SETTINGS.shape, False)
    early: list[dict] = []
    pending_seen: list[bool] = []

    def on_early(raw):
        early.append(raw)
        pending_seen.append(cache.pending_path(path).exists())

    raw = probe_or_reuse(argv, SETTINGS, fresh=False, early=on_early)
    assert len(early) == 1 and early[0]["partial"] and early[0]["cache"]["timing"] == "under way"
    assert pending_seen == [True] and not cache.pending_path(path).exists()  # cleared at the end
    facts, _ = parse_probe(early[0], SETTINGS.timeout_s)
    assert verdict(facts).timing_pending
    entry = cache.load(path).entry
    assert entry["verdict"] == {"flash_ok": True, "flash_kernel": "sdpa_cudnn", "kernel_timings": TIMINGS}
    assert raw["cache"]["reused"] is False and "partial" not in raw


def test_a_failed_timing_leaves_no_cache_entry_and_no_marker(tmp_path):
    argv = _fake_probe(tmp_path, hold_s=0.1, final=False)  # prints its early facts, then dies
    argv[1:1] = ["-c", "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0]); sys.exit(3)"]
    path = cache.path_for(SETTINGS.shape, False)
    raw = probe_or_reuse(argv, SETTINGS, fresh=False, early=lambda raw: None)
    assert raw["returncode"] == 3
    assert cache.load(path).entry is None and not cache.pending_path(path).exists()


def test_the_local_probe_lets_the_plan_go_on_before_the_timing_ends(tmp_path, monkeypatch):
    argv = _fake_probe(tmp_path, hold_s=2.0)
    monkeypatch.setattr(fanout, "probe_command", lambda settings: argv)
    probe = fanout.LocalProbe(SETTINGS, fresh=False)
    raw, issue = probe.result(30)
    assert issue is None and raw["partial"] and probe.partial and probe.finished is None
    assert probe.ended is not None and probe.ended - probe.started < 1.8
    assert probe.final(0.0)[1].cause.code == "hang"  # not over yet, and final(0) does not wait
    raw, issue = probe.final(30)
    assert issue is None and "partial" not in raw and probe.finished >= probe.ended
    assert parse_probe(raw, 30)[0]["kernel_selection"]["kernel"] == "sdpa_cudnn"


# ---------------------------------------------------------------- the worker waits for the choice


WORKER = AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2, dtype="auto")
CPU = torch.device("cpu")


def _worker(tmp_path, requested="flash", **how):
    """As a worker chooses: the node's verdict where it holds."""
    resolved = attention.choose(requested, WORKER, CPU, log_dir=tmp_path, **how)
    return resolved, resolved.verdict


def _store_later(path: Path, key: dict, delay_s: float, kernel: str) -> threading.Thread:
    def store():
        time.sleep(delay_s)
        cache.store(path, key, {"stdout": ""}, {"flash_ok": True, "flash_kernel": kernel,
                                                "kernel_timings": {kernel: 1.0, "sdpa_math": 2.0}})
        cache.clear_pending(path)

    t = threading.Thread(target=store)
    t.start()
    return t


def test_a_worker_waits_for_its_nodes_probe_still_timing_and_takes_its_choice(tmp_path):
    key = cache.node_key(WORKER, False)
    path = cache.entry_path(key)
    cache.mark_pending(path, time.time() + 30)
    writer = _store_later(path, key, 1.0, "sdpa_flash_cpu")
    resolved, reuse = _worker(tmp_path)
    writer.join()
    assert resolved.kernel == "sdpa_flash_cpu" and reuse["reused"] is True and reuse["waited_s"] >= 0.8
    assert resolved.timings == {"sdpa_flash_cpu": 1.0, "sdpa_math": 2.0}  # the record's kernel_timings


def test_the_worker_hears_the_verdict_looked_up_after_the_probes_timing_and_before_its_check(tmp_path, monkeypatch):
    """trainer.loop builds the model once the lookup is done: never while this node's probe is
    still timing kernels on the GPU, and beside the worker's own check of the kernel."""
    key = cache.node_key(WORKER, False)
    path = cache.entry_path(key)
    cache.mark_pending(path, time.time() + 30)
    events = []
    real_check = kernels.check_kernel
    monkeypatch.setattr(kernels, "check_kernel", lambda fn, **kw: events.append("check") or real_check(fn, **kw))
    writer = _store_later(path, key, 1.0, "sdpa_flash_cpu")
    t0 = time.monotonic()
    resolved, reuse = _worker(tmp_path, looked_up=lambda: events.append(("looked up", time.monotonic() - t0)))
    writer.join()
    assert reuse["reused"] is True and events[0][0] == "looked up" and events[0][1] >= 0.8
    assert events[1:] == ["check"]
    heard = []
    _worker(tmp_path, "standard", looked_up=lambda: heard.append(1))
    assert heard == [1]  # no verdict to look up: at once


def test_a_worker_waits_for_a_fresh_probe_even_where_an_older_entry_is_there(tmp_path):
    key = cache.node_key(WORKER, False)
    path = cache.entry_path(key)
    cache.store(path, key, {"stdout": ""}, {"flash_ok": True, "flash_kernel": "standard", "kernel_timings": {}})
    cache.mark_pending(path, time.time() + 30)  # --fresh-preflight: a new probe is timing
    writer = _store_later(path, key, 1.0, "sdpa_flash_cpu")
    resolved, reuse = _worker(tmp_path)
    writer.join()
    assert resolved.kernel == "sdpa_flash_cpu" and reuse["waited_s"] >= 0.8


def test_a_worker_does_not_wait_for_a_dead_or_expired_probe(tmp_path):
    path = cache.entry_path(cache.node_key(WORKER, False))
    path.parent.mkdir(parents=True, exist_ok=True)
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    cache.pending_path(path).write_text(json.dumps({"pid": dead, "until": time.time() + 60}))
    t0 = time.monotonic()
    resolved, reuse = _worker(tmp_path)
    assert time.monotonic() - t0 < 5 and reuse["reused"] is False and "waited_s" not in reuse
    assert resolved.kernel == attention.choose("flash", WORKER, CPU, reuse_verdict=False, time_kernels=False).kernel
    cache.mark_pending(path, time.time() - 1)  # this process, but its deadline passed
    assert cache.wait_for(path)[1] < 0.5


# ---------------------------------------------------------------- the picker's hook


def test_the_hook_before_timing_runs_only_when_kernels_are_timed(tmp_path):
    shape = AttentionShape(seq_len=64, micro_batch=1, n_heads=4, n_kv_heads=2, head_dim=16, dtype="fp32",
                           compile="false")
    calls = []
    timer = {"a": 2.0, "b": 1.0}.__getitem__

    def pick(passed):
        return choice.fastest_here(passed, shape, CPU, tmp_path / "entry.json", timer=lambda name, fn: timer(name),
                                   before_timing=lambda: calls.append("timing"))

    fn = attention.standard_attention
    assert pick({"a": fn, "b": fn}) == ("b", {"a": 2.0, "b": 1.0}) and calls == ["timing"]
    assert pick({"a": fn, "b": fn})[0] == "b" and calls == ["timing"]  # cached: nothing timed
    assert pick({"a": fn}) == ("a", {}) and calls == ["timing"]  # one candidate: nothing to time
