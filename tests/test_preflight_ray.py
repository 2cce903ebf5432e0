"""Preflight on Ray: the probe as a task on each node, and a run whose flash-attn is broken."""

import json
import logging
import os

import pytest

from orchestrator.plan import nodes_from_preflight
from orchestrator.preflight import ProbeSettings, fanout, run_preflight
from orchestrator.run import TrainOptions, train
from tests.conftest import ROOT, write_config
from tests.preflight_fakes import IMPORT_ERRORS, fake_flash_attn, import_failing

# These tests fake the node's flash-attn in the probe's command line alone.
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("probe_cache_restored")]


def test_a_node_whose_probe_prints_garbage_is_reported_and_gets_standard_attention(ray_session):
    report = run_preflight(ProbeSettings(timeout_s=30), command=["python", "-c", "print('no facts here')"])
    [node] = report.nodes
    assert node.node_id == ray_session.get_runtime_context().get_node_id()
    assert not node.verdict.flash_ok and node.verdict.issues[0].cause.code == "probe_garbage"
    assert report.outcome_lines() == ["Flash Attention is disabled - will use standard attention implementation"]
    assert nodes_from_preflight(report)[0].flash_reason == "preflight the probe returned no readable facts"


def test_flash_attn_that_crashes_on_import_gives_standard_attention_and_the_run_still_trains(
        ray_session, tmp_path, monkeypatch, caplog):
    """The node's flash-attn segfaults on import (a broken .so): preflight finds it in a child,
    logs why, and the flash variant's workers get standard attention and DISABLE_FLASH_ATTN=1."""
    site = fake_flash_attn(tmp_path / "site", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    real = fanout.probe_command
    # Only the probe sees the broken install; a wrapper puts it first on the child's path.
    monkeypatch.setattr(fanout, "probe_command",
                        lambda s: ["env", f"PYTHONPATH={site}{os.pathsep}{ROOT}"] + real(s))
    cfg = write_config(tmp_path / "c.yaml", {"train": {"max_steps": 3, "checkpoint_every": 3}})
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        summary = train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name="r"))
    rec = summary.variants["flash"]
    assert rec.status == "succeeded" and rec.steps == 3
    assert rec.attention == "flash" and rec.backend == "standard"
    assert rec.env == {"ATTN_IMPL": "standard", "DISABLE_FLASH_ATTN": "1"}
    assert "import flash_attn killed the process (SIGSEGV)" in rec.reason
    assert all(w["flash_attn_imports_blocked"] for w in rec.workers)
    run = tmp_path / "runs" / "r"
    plan = json.loads((run / "plan.json").read_text())["variants"][0]
    assert plan["env"]["ATTN_IMPL"] == "standard" and "flash attention works on no node" in plan["reason"]
    [node] = json.loads((run / "preflight.json").read_text())["nodes"]
    assert [(i["check"], i["code"]) for i in node["verdict"]["issues"]] == [("import flash_attn", "crash")]
    log = (run / "flash_attention_log.txt").read_text()
    assert "[crash] import flash_attn: import flash_attn killed the process (SIGSEGV)" in log and "fix: " in log
    assert "Flash Attention is disabled - will use standard attention implementation" in caplog.text
    assert f"flash attention log: {run / 'flash_attention_log.txt'}" in caplog.text


@pytest.mark.parametrize("code", sorted(IMPORT_ERRORS))
def test_each_real_import_error_is_classified_in_preflight_json_and_the_log(ray_session, tmp_path, code):
    """A node whose flash-attn import fails with a real user-reported error: preflight.json and
    flash_attention_log.txt name the cause, the fix and the raw text; the node still trains with
    a fused kernel that does not need the broken package."""
    site = fake_flash_attn(tmp_path / "site", import_failing(IMPORT_ERRORS[code]))
    settings = ProbeSettings(timeout_s=60)
    report = run_preflight(settings, command=["env", f"PYTHONPATH={site}{os.pathsep}{ROOT}"]
                           + fanout.probe_command(settings))
    json_path, log_path = report.write(tmp_path / "out")
    [node] = json.loads(json_path.read_text())["nodes"]
    issues = [(i["check"], i["code"]) for i in node["verdict"]["issues"]]
    assert ("import flash_attn", code) in issues
    assert node["facts"]["flash_attn"]["distributions"][0]["version"] == "2.7.4.post1"
    log_text = log_path.read_text()
    assert f"[{code}] import flash_attn" in log_text and "fix: " in log_text
    assert IMPORT_ERRORS[code].partition(": ")[2] in log_text  # the raw error, as the user would search it
    assert node["verdict"]["flash_ok"] and node["verdict"]["flash_kernel"] == "sdpa_flash_cpu"
