"""Live progress of a resumed variant: where it starts, then only the steps it trains."""

from __future__ import annotations

import json

from orchestrator.progress import ProgressFollower


def _rec(step: int) -> str:
    return json.dumps({"step": step, "loss": 5.0, "tokens_per_s": 100.0, "step_time_s": 0.1}) + "\n"


def test_a_resumed_variant_says_where_it_starts_and_does_not_replay_old_steps(tmp_path, caplog):
    metrics, attempts = tmp_path / "metrics.jsonl", tmp_path / "attempts.jsonl"
    metrics.write_text("".join(_rec(s) for s in range(1, 36)))  # the killed run got to 35
    attempts.write_text(json.dumps({"start_step": 0, "restored_from": None}) + "\n")
    with caplog.at_level("INFO", logger="orchestrator.progress"):
        with ProgressFollower(metrics, "flash", 40, interval_s=0.05):
            with attempts.open("a") as f:  # the controller: a failed group; rank 0: the attempt, then metrics
                f.write(json.dumps({"failed_ranks": {"1": "A worker health check has been hanging"}}) + "\n")
                f.write(json.dumps({"start_step": 30, "world_size": 1,
                                    "restored_from": "/r/flash/checkpoints/checkpoint_00000030"}) + "\n")
            metrics.write_text("".join(_rec(s) for s in range(1, 31)))
            with metrics.open("a") as f:
                f.write(_rec(31) + _rec(32))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "[flash] rank 1 failed: A worker health check has been hanging"
    assert lines[1] == "[flash] resuming at step 30 from checkpoint_00000030 with 1 worker(s)"
    assert [line.split()[2] for line in lines[2:]] == ["31/40", "32/40"]
