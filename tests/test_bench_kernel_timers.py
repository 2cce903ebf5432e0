"""bench.kernel_timers on CPU: every timer and the training steps, each kernel's row and which
kernel each timer would choose, in JSON a script can read."""

import json
import statistics

import pytest
import yaml

from bench import kernel_timers


def test_each_timer_is_put_beside_the_training_steps_with_its_choice(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"dim": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128},
        "train": {"seq_len": 32, "micro_batch_size": 2, "max_steps": 10, "dtype": "fp32", "compile": False},
        "scaling": {"num_workers": 1, "use_gpu": False}}))
    out = tmp_path / "timers.json"
    assert kernel_timers.main([str(config), str(out), "--depths", "0,3", "--rounds", "2", "--warmup", "1",
                               "--iters", "2"]) == 0
    report = json.loads(out.read_text())
    assert report["kernels"] == ["sdpa_flash_cpu", "standard"]  # the CPU's fused kernel, then standard
    assert report["shape"]["ffn_hidden"] == 128 and report["shape"]["n_layers"] == 3
    for depth in ("0", "3"):
        assert set(report["timers"][depth]) == {"sdpa_flash_cpu", "standard"}
        assert all(ms > 0 for ms in report["timers"][depth].values())
        choice = report["summary"][depth]["choice"]
        assert choice == min(report["timers"][depth], key=report["timers"][depth].get)
        medians = {k: statistics.median(v) for k, v in report["end_to_end"].items()}
        assert report["summary"][depth]["choice_over_best"] == pytest.approx(medians[choice] / max(medians.values()))
    assert all(len(runs) == 2 for runs in report["end_to_end"].values())
