"""bench/ddp/candidates.py on CPU: the same processes, model build and DDP wrapping over gloo,
on tiny shapes (the figures themselves come from two GPUs: docs/BENCHMARKS.md)."""

import json

import pytest

from bench.ddp import candidates


def test_each_variant_runs_in_its_own_processes_and_reports_its_scaling(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert candidates.main([str(out), "--only", "1gpu,bucket_25", "--warmup", "1", "--iters", "2"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["name"], r["world"]) for r in rows] == [("1gpu", 1), ("bucket_25", 2)]
    assert all(r["tok_s"] > 0 and r["step_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| 1gpu | 1 |" in printed and "1.000x" in printed and "| bucket_25 | 2 |" in printed


def test_a_variant_that_fails_is_a_row_with_its_error_and_a_failing_exit(tmp_path):
    # The bf16 compression hook needs NCCL: over gloo both ranks raise.
    out = tmp_path / "rows.json"
    assert candidates.main([str(out), "--only", "bf16_hook", "--warmup", "1", "--iters", "1"]) == 1
    (row,) = json.loads(out.read_text())
    assert row["name"] == "bf16_hook" and "exit codes" in row["error"]


def test_unknown_variant_names_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        candidates.main([str(tmp_path / "x.json"), "--only", "bucket_9"])
    assert "unknown variant(s) bucket_9" in capsys.readouterr().err
