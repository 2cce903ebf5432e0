"""train.float8: torchao's fp8 training on GPUs of compute capability 8.9+, a usage error anywhere
else, refused before anything is launched."""

import pytest
import torch

from orchestrator import config as config_mod
from orchestrator import run as run_mod
from orchestrator.plan import Plan, PlannedVariant
from tests.conftest import run_cli, write_config
from trainer import float8
from trainer.model import ModelArgs, Transformer


def test_float8_is_off_by_default_and_a_typed_train_key():
    cfg = config_mod.validate({"train": {"float8": True}}, "x.yaml")
    assert cfg.train.float8 is True and config_mod.validate({}, "x.yaml").train.float8 is False


@pytest.mark.parametrize("use_gpu,caps,expected", [
    (False, [], "these workers run on CPU"), (True, ["8.0"], "found 8.0"), (True, ["9.0", "7.5"], "found 7.5"),
    (True, ["9.0"], None), (True, ["8.9", "10.0"], None)])
def test_float8_needs_gpus_of_compute_capability_8_9_or_newer(use_gpu, caps, expected):
    problem = float8.refusal(use_gpu, caps)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem and "train.float8" in problem and "\n" not in problem


def test_float8_in_a_cpu_worker_is_a_clear_error_naming_the_key():
    model = Transformer(ModelArgs(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                                  max_seq_len=16), lambda q, k, v: q)
    with pytest.raises(ValueError, match=r"train\.float8: true needs NVIDIA GPUs .* run on CPU"):
        float8.convert(model, torch.device("cpu"))


def test_the_output_head_and_layers_with_dims_not_divisible_by_16_stay_in_high_precision():
    model = Transformer(ModelArgs(vocab_size=100, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=120,
                                  max_seq_len=16, tie_embeddings=False), lambda q, k, v: q)
    kept = {fqn for fqn, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and float8.keep_in_high_precision(m, fqn)}
    # output (vocab 100 too), and w1/w3/w2 whose hidden size 120 is not a multiple of 16
    assert kept == {"output", "layers.0.mlp.w1", "layers.0.mlp.w3", "layers.0.mlp.w2"}


def test_float8_on_a_cpu_plan_is_refused_before_launch_naming_the_variant_and_key():
    cfg = config_mod.validate({"train": {"float8": True}}, "x.yaml")
    variants = config_mod.variant_configs(cfg, False, False)
    plan = Plan([PlannedVariant(name=variants[0].name, attention="flash", env={}, num_workers=2, use_gpu=False,
                                cpus_per_worker=1)], "sequential")
    problem = run_mod.float8_refusal(cfg, variants, plan, None)
    assert problem.startswith(f"variant {variants[0].name}: train.float8: true needs NVIDIA GPUs")


@pytest.mark.ray  # a CLI subprocess; it exits before Ray starts
def test_train_with_float8_on_cpu_exits_2_with_one_line_naming_train_float8(tmp_path, cli_env):
    cfg = write_config(tmp_path / "c.yaml", {"train": {"float8": True}, "scaling": {"use_gpu": False}})
    out = run_cli(["train", "--config-file", str(cfg), "--output-dir", str(tmp_path / "runs")], cli_env, tmp_path)
    assert out.returncode == 2, out.stderr
    [line] = [l for l in out.stderr.splitlines() if "train.float8" in l]
    assert "needs NVIDIA GPUs" in line and not (tmp_path / "runs").exists()


def test_convert_swaps_every_linear_but_the_head_with_the_recorded_recipe(monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setattr(float8, "refusal", lambda use_gpu, caps: None)  # the swap itself runs no fp8 matmul
    model = Transformer(ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                                  max_seq_len=16, tie_embeddings=False), lambda q, k, v: q)
    float8.convert(model, torch.device("cpu"))
    kinds = {fqn: type(m).__name__ for fqn, m in model.named_modules() if "Linear" in type(m).__name__}
    assert kinds.pop("output") == "Linear"
    assert len(kinds) == 2 * 7 and set(kinds.values()) == {"Float8Linear"}
    assert float8.RECIPE == "tensorwise"
    granularity = model.layers[1].mlp.w2.config.cast_config_grad_output.scaling_granularity
    assert granularity.value == float8.RECIPE


@pytest.mark.parametrize("recipe", float8.RECIPES)
def test_the_recipe_is_a_train_key_that_converts_with_it(monkeypatch, recipe):
    pytest.importorskip("torchao")
    cfg = config_mod.validate({"train": {"float8": True, "float8_recipe": recipe}}, "x.yaml")
    assert cfg.train.float8_recipe == recipe
    monkeypatch.setattr(float8, "refusal", lambda use_gpu, caps: None)
    model = Transformer(ModelArgs(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                                  max_seq_len=16, tie_embeddings=False), lambda q, k, v: q)
    float8.convert(model, torch.device("cpu"), recipe)
    granularity = model.layers[0].attn.wq.config.cast_config_input.scaling_granularity.value
    assert granularity == ("tensorwise" if recipe == "tensorwise" else "axiswise")


@pytest.mark.parametrize("train, message", [
    ({"float8": True, "float8_recipe": "blockwise"}, "train.float8_recipe: Input should be 'tensorwise', 'rowwise'"),
    ({"float8_recipe": "rowwise"}, "float8_recipe (rowwise) applies only with float8: true"),
])
def test_a_bad_or_idle_recipe_is_a_config_error_naming_the_key(train, message):
    with pytest.raises(Exception) as e:
        config_mod.validate({"train": train}, "x.yaml")
    assert message in str(e.value)
