"""Every JSON file the project writes parses with a strict parser (issue 32): a NaN or
infinite float, anywhere in it, is written as null."""

from __future__ import annotations

import json
import math

import pytest

from trainer import atomic_write, strict_json
from trainer.metrics import MetricsWriter, append_attempt


def strict_loads(text: str):
    """json.loads as jq or JavaScript read JSON: NaN, Infinity and -Infinity are errors."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_at_any_depth_are_written_as_null_and_the_rest_unchanged():
    data = {"loss": math.nan, "steps": [1.5, math.inf, {"t": -math.inf}], "pair": (2, math.nan), "name": "nan", "n": 3}
    text = strict_json.dumps(data, indent=1)
    assert strict_loads(text) == {"loss": None, "steps": [1.5, None, {"t": None}], "pair": [2, None],
                                  "name": "nan", "n": 3}
    with pytest.raises(ValueError):
        strict_loads(json.dumps(data))  # what the files held before


def test_the_project_writers_write_strict_json(tmp_path):
    atomic_write.write_json(tmp_path / "summary.json", {"final_loss": math.nan})
    assert strict_loads((tmp_path / "summary.json").read_text()) == {"final_loss": None}
    append_attempt(tmp_path, {"start_step": 0, "t": math.inf})
    assert strict_loads((tmp_path / "attempts.jsonl").read_text()) == {"start_step": 0, "t": None}
    writer = MetricsWriter(tmp_path, start_step=0)
    writer.write({"step": 1, "loss": math.nan, "grad_norm": 2.0})
    writer.close()
    assert strict_loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None, "grad_norm": 2.0}
