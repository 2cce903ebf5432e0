"""MFU and tokens/s per GPU in the live output: computed by the worker for GPU runs (n/a on CPU),
shown in the progress lines, and written where TensorBoard and summary.json read them."""

import json
import logging

import pytest
import torch

from orchestrator.progress import ProgressFollower
from trainer import timing
from trainer.metrics import MetricsWriter


def test_per_gpu_figures_divide_by_the_workers_and_the_device_peak():
    # 2 workers at 200,000 tok/s together, 6e9 FLOPs per token, H100 peak 989 TFLOP/s
    got = timing.per_gpu(200_000.0, 2, 6e9, torch.device("cuda"), 989.0)
    assert got["tokens_per_s_per_gpu"] == 100_000.0
    assert got["mfu"] == pytest.approx(6e9 * 100_000 / 989e12)


def test_per_gpu_figures_are_none_on_cpu_and_mfu_none_on_a_gpu_of_unknown_peak():
    assert timing.per_gpu(5000.0, 2, 1e6, torch.device("cpu"), None) == {"tokens_per_s_per_gpu": None, "mfu": None}
    assert timing.per_gpu(5000.0, 1, 1e6, torch.device("cuda"), None) == {"tokens_per_s_per_gpu": 5000.0, "mfu": None}


def test_the_progress_line_shows_mfu_and_tokens_per_gpu_when_measured(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    gpu = {"step": 1, "loss": 7.5, "tokens_per_s": 160_000.0, "step_time_s": 0.1, "mfu": 0.557,
           "tokens_per_s_per_gpu": 80_000.0}
    cpu = {"step": 2, "loss": 7.4, "tokens_per_s": 6000.0, "step_time_s": 0.3, "mfu": None, "tokens_per_s_per_gpu": None}
    with caplog.at_level(logging.INFO, logger="orchestrator.progress"):
        with ProgressFollower(path, "flash", 2, interval_s=0.05):  # follows what is written after it starts
            path.write_text(json.dumps(gpu) + "\n" + json.dumps(cpu) + "\n")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "[flash] step 1/2  loss 7.5000  160000 tok/s  0.100 s/step  MFU 55.7%  80,000 tok/s/GPU"
    assert lines[1] == "[flash] step 2/2  loss 7.4000  6000 tok/s  0.300 s/step"


def test_mfu_goes_to_tensorboard_with_the_other_scalars(tmp_path):
    from tests.test_comparison import tensorboard_scalars

    writer = MetricsWriter(tmp_path, start_step=0)
    writer.write({"step": 1, "loss": 7.5, "tokens_per_s": 1.0, "mfu": 0.557, "tokens_per_s_per_gpu": 80_000.0})
    writer.close()
    assert tensorboard_scalars(tmp_path / "tb", "mfu") == {1: pytest.approx(0.557)}
    assert tensorboard_scalars(tmp_path / "tb", "tokens_per_s_per_gpu") == {1: 80_000.0}
