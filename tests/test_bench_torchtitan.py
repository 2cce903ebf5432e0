"""The torchtitan side-by-side (bench/torchtitan): our YAML in torchtitan's terms, its log read
by our steady rule, and the ratio. torchtitan itself is needed only by the last test."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.torchtitan import assets, compare, parse, run, shape
from tests.conftest import ROOT
from trainer.result import StepTimes

LLAMA3_8B = ROOT / "configs" / "llama3-8b.yaml"

# torchtitan 0.2.2's metrics lines as torchrun --role rank --tee 3 prints them (colours on).
LOG = """\
[rank0]:[titan] 2026-11-28 01:00:00,000 - root - INFO - torchtitan version: 0.2.2 (0.0.0 means ...)
[rank0]:[titan] 2026-11-28 01:00:01,000 - root - INFO - Model llama3 orchestrator size: 8,030,261,248 total parameters
[rank0]:[titan] 2026-11-28 01:02:00,000 - root - INFO - \x1b[31mstep:  1  \x1b[32mloss: 12.25000  \x1b[33mgrad_norm: 15.1234  \x1b[34mmemory: 50.10GiB(63.28%)  \x1b[34mtps: 41  \x1b[36mtflops: 2.01  \x1b[35mmfu: 0.20%\x1b[39m
[rank0]:[titan] 2026-11-28 01:02:20,000 - root - INFO - step: 10  loss: 10.50000  grad_norm:  3.0000  memory: 70.00GiB(88.43%)  tps: 1,800  tflops: 88.00  mfu: 8.90%
[rank0]:[titan] 2026-11-28 01:02:40,000 - root - INFO - step: 20  loss:  8.00000  grad_norm:  2.0000  memory: 70.50GiB(89.06%)  tps: 2,048  tflops: 100.00  mfu: 10.11%
[rank0]:[titan] 2026-11-28 01:03:00,000 - root - INFO - step: 30  loss:  7.00000  grad_norm:  1.5000  memory: 70.25GiB(88.74%)  tps: 2,000  tflops: 98.00  mfu: 9.91%
"""


def test_llama3_8b_is_built_by_torchtitan_with_its_own_8b_ffn_arguments():
    model = shape.model_section(LLAMA3_8B)
    kw = shape.titan_kwargs(model)
    assert (kw["multiple_of"], kw["ffn_dim_multiplier"]) == (1024, 1.3)
    assert shape.titan_ffn_hidden(kw["dim"], kw["multiple_of"], kw["ffn_dim_multiplier"]) == 14336
    assert {k: kw[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "rope_theta")} == \
        {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}
    assert (kw["attn_type"], kw["attn_mask_type"]) == ("sdpa", "causal")


def test_an_ffn_size_of_another_rounding_is_still_built_exactly():
    mult, factor = shape.ffn_args(64, 256)
    assert shape.titan_ffn_hidden(64, mult, factor) == 256


def test_an_ffn_torchtitan_cannot_build_is_refused_by_name(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {dim: 4096, n_layers: 2, n_heads: 32, ffn_hidden: 4000, vocab_size: 1000, "
                   "tie_embeddings: false}\n")
    with pytest.raises(ValueError, match="ffn_hidden 4000"):
        shape.model_section(cfg)


def test_a_tied_head_or_a_missing_vocab_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {dim: 64, n_layers: 2, n_heads: 4, ffn_hidden: 256, vocab_size: 1000}\n")
    with pytest.raises(ValueError, match="tie_embeddings"):
        shape.model_section(cfg)
    cfg.write_text("model: {dim: 64, n_layers: 2, n_heads: 4, ffn_hidden: 256, tie_embeddings: false}\n")
    with pytest.raises(ValueError, match="model.vocab_size"):
        shape.model_section(cfg)


def test_torchtitan_gets_the_8b_yaml_training_settings():
    args = run.titan_overrides(shape.load(LLAMA3_8B), steps=30, nproc=2)
    opts = dict(zip(args[::2], args[1::2]))
    assert opts["--training.seq_len"] == "4096"
    assert opts["--training.local_batch_size"] == "2"  # micro-batch 2 per GPU
    assert opts["--training.global_batch_size"] == "4"  # over 2 GPUs
    assert opts["--training.mixed_precision_param"] == "bfloat16"
    assert opts["--activation_checkpoint.mode"] == "full"
    assert opts["--metrics.log_freq"] == "10"
    assert float(opts["--lr_scheduler.min_lr_factor"]) == pytest.approx(0.1)
    assert "--compile.enable" in args and "--compile.no-enable" not in args


@pytest.mark.parametrize("setting,flags", [
    (False, ["none"]), (True, ["full"]), (1, ["full"]),
    (2, ["selective", "--activation_checkpoint.selective_ac_option", "2"]),
    (4, ["selective", "--activation_checkpoint.selective_ac_option", "4"]),
])
def test_activation_checkpointing_is_torchtitans_none_full_or_selective_every_nth_layer(setting, flags):
    cfg = shape.load(LLAMA3_8B)
    cfg["train"]["activation_checkpointing"] = setting
    args = run.titan_overrides(cfg, steps=30, nproc=2)
    at = args.index("--activation_checkpoint.mode")
    assert args[at + 1:at + 1 + len(flags)] == flags
    assert args.count("--activation_checkpoint.selective_ac_option") == (len(flags) > 1)


@pytest.mark.parametrize("setting", [0, -1, 1.5, "yes", "2", None])
def test_an_activation_checkpointing_torchtitan_has_no_flags_for_is_refused_by_name(setting):
    cfg = shape.load(LLAMA3_8B)
    cfg["train"]["activation_checkpointing"] = setting
    with pytest.raises(ValueError, match=r"^train.activation_checkpointing .*: expected false, true or a whole "):
        run.titan_overrides(cfg, steps=30, nproc=2)


def test_torchtitans_selective_layers_are_as_many_as_ours_from_the_other_end(monkeypatch):
    ac = pytest.importorskip("torchtitan.distributed.activation_checkpoint",
                             reason="torchtitan is not installed (bench-only)")
    import torch.nn as nn
    from torchtitan.config.job_config import ActivationCheckpoint

    from trainer.model import checkpointed

    for n_layers, every in ((32, 2), (32, 4), (32, 3), (5, 2), (4, 1)):
        monkeypatch.setattr(ac, "_layer_sac_count", 0)  # torchtitan counts layers in a module global
        layers = [ac._apply_ac_to_transformer_block(nn.Linear(2, 2), ActivationCheckpoint(
            mode="selective", selective_ac_option=str(every))) for _ in range(n_layers)]
        titan = [i for i, layer in enumerate(layers) if not isinstance(layer, nn.Linear)]  # wrapped
        ours = [i for i in range(n_layers) if checkpointed(i, every)]
        assert titan == [i + every - 1 for i in ours if i + every - 1 < n_layers]
        if n_layers % every == 0:
            assert len(titan) == len(ours)


def test_the_command_is_torchrun_of_torchtitan_train_with_the_local_assets(tmp_path):
    cmd = run.command(config_file=LLAMA3_8B, out=tmp_path, tokenizer=tmp_path / "tok", data=tmp_path / "data",
                      steps=30, nproc=2, cpu=False, extra=[])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert cmd[cmd.index("-m", 3) + 1] == "torchtitan.train"
    assert cmd[cmd.index("--model.hf_assets_path") + 1] == str(tmp_path / "tok")
    assert cmd[cmd.index("--training.dataset_path") + 1] == str(tmp_path / "data")
    env = run.environment(LLAMA3_8B, tmp_path, cpu=False)
    assert env["HF_HUB_OFFLINE"] == env["HF_DATASETS_OFFLINE"] == "1" and env["NCCL_NVLS_ENABLE"] == "0"


def test_metrics_lines_are_read_through_colours_and_rank_prefixes():
    records = parse.step_records(LOG)
    assert [r["step"] for r in records] == [1, 10, 20, 30]
    assert records[0]["loss"] == 12.25 and records[2]["tokens_per_s_per_gpu"] == 2048.0
    assert records[1]["memory_reserved_gib"] == 70.0
    assert parse.first_match(parse.PARAMS_LINE, LOG) == "8,030,261,248"
    assert parse.first_match(parse.VERSION_LINE, LOG) == "0.2.2"


def test_the_steady_figure_is_our_median_rule_over_every_step():
    records = parse.step_records(LOG)
    times = parse.per_step_times(records, 4096)
    assert len(times) == 30 and times[1:10] == [4096 / 1800] * 9
    st = StepTimes()
    st.times = list(times)
    assert parse.steady(records, 4096)["step_time_s"] == st.steady_median()
    # 27 steps after warm-up: 7 at 1800 tok/s, 10 at 2048, 10 at 2000 -> the median is 2000.
    assert parse.steady(records, 4096)["tokens_per_s_per_gpu"] == pytest.approx(2000.0)
    assert statistics.median([1800] * 7 + [2048] * 10 + [2000] * 10) == 2000


def test_the_error_line_is_the_exception_torchtitan_raised():
    text = ("[rank0]:Traceback (most recent call last):\n[rank0]:  File \"x.py\", line 1\n"
            "[rank0]:ImportError: cannot import name 'DataParallelMeshDims' from 'torch.distributed.fsdp'\n"
            "E1128 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 1)\n")
    assert run.error_of(text) == "ImportError: cannot import name 'DataParallelMeshDims' from 'torch.distributed.fsdp'"


def _summary(tokens_per_s=4200.0, workers=2):
    return {"variants": {"flash": {"status": "succeeded", "num_workers": workers, "tokens_per_s": tokens_per_s,
                                   "tokens_per_s_per_gpu": tokens_per_s / workers, "step_time_s": 1.9,
                                   "mfu": 0.4, "peak_mem_bytes": 70 * 2**30, "peak_mem_kind": "cuda_max_allocated",
                                   "flops_per_token": 5.0e10, "steps": 30, "backend": "sdpa_cudnn"}}}


def _titan(per_gpu=2000.0, gpus=2):
    return {"status": "succeeded", "gpus": gpus, "tokens_per_s": per_gpu * gpus, "tokens_per_s_per_gpu": per_gpu,
            "step_time_s": 2.0, "peak_memory_reserved_gib": 71.0, "steps": 30,
            "device": "NVIDIA H100 80GB HBM3", "versions": {"torchtitan": "0.2.2"}}


def test_the_ratio_is_ours_over_torchtitans_total_with_both_mfus_by_our_definition():
    result = compare.compare(_summary(), _titan())
    assert result["ratio"] == pytest.approx(4200 / 4000) and result["met"] is True
    titan_row = result["rows"][1]
    assert titan_row["mfu"] == pytest.approx(5.0e10 * 2000 / 989e12)
    assert "1.050x" in compare.table(result)


def test_no_ratio_when_a_side_failed_or_the_gpu_counts_differ():
    failed = {"status": "failed", "gpus": 2, "error": "torch.OutOfMemoryError: CUDA out of memory"}
    result = compare.compare(_summary(), failed)
    assert result["ratio"] is None and "OutOfMemoryError" in result["problems"][0]
    assert "different GPU counts" in compare.compare(_summary(), _titan(gpus=1))["problems"][0]


def test_the_local_assets_are_a_tokenizer_folder_and_a_jsonl_dataset(tmp_path):
    from tokenizers import Tokenizer

    tok_dir, data_dir = assets.build(tmp_path)
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.token_to_id(assets.EOS) is not None and tok.get_vocab_size() < 128256
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == (assets.BOS, assets.EOS)
    lines = (data_dir / assets.DATA_FILE).read_text().splitlines()
    assert len(lines) > 10 and all(json.loads(ln)["text"] for ln in lines)


def test_torchtitan_builds_the_8b_flavor_with_exactly_our_parameter_shapes(monkeypatch):
    pytest.importorskip("torchtitan.models.llama3", reason="torchtitan is not installed (bench-only)")
    import torch

    monkeypatch.setenv("TITAN_MODEL_CONFIG", str(LLAMA3_8B))
    from bench.torchtitan import flavor
    from torchtitan.models.llama3 import Transformer, llama3_args

    args = llama3_args[flavor.FLAVOR]
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["tok_embeddings.weight"] == (128256, 4096) and shapes["output.weight"] == (128256, 4096)
    assert shapes["layers.0.feed_forward.w1.weight"] == (14336, 4096)
    assert shapes["layers.0.attention.wk.weight"] == (8 * 128, 4096)
    assert len(model.layers) == 32
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_the_launchers_defaults_are_our_train_configs():
    from trainer.config import TrainConfig

    ours = TrainConfig()
    assert {k: getattr(ours, k) for k in run.TRAIN_DEFAULTS} == run.TRAIN_DEFAULTS
