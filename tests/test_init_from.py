"""``model.init_from``: the shapes of a local Hugging Face Llama fill the run's config before
launch; a directory that is not a Llama checkpoint, or a set field that disagrees, is a
one-line usage error. Training from one is in test_hf_ray.py."""

import json

import pytest
import torch
import yaml

from orchestrator import preprocess
from orchestrator.errors import UsageError
from orchestrator.run import TrainOptions, prepare
from tests.conftest import write_config
from trainer import dataset as dataset_mod

transformers = pytest.importorskip("transformers")


def tiny_llama(path, *, vocab_size=None, seed=0, **kw):
    """A random LlamaForCausalLM saved with transformers' own save_pretrained (GQA, untied)."""
    cfg = dict(vocab_size=vocab_size or dataset_mod.load_dataset(preprocess.embedded_dataset()).vocab_size,
               hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=20000.0, tie_word_embeddings=False,
               max_position_embeddings=128, initializer_range=0.1)  # far from uniform: a loss of its own
    cfg.update(kw)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    model.save_pretrained(path)
    return model


def _prepare(tmp_path, overrides):
    return prepare(TrainOptions(config_file=str(write_config(tmp_path / "c.yaml", overrides)),
                                output_dir=str(tmp_path / "runs")))


def test_shapes_come_from_the_checkpoint_and_agreeing_fields_are_fine(tmp_path):
    tiny_llama(tmp_path / "llama")
    # TINY sets dim 64, 2 layers, 4 heads, 2 kv heads: all as in the checkpoint.
    prep = _prepare(tmp_path, {"model": {"init_from": str(tmp_path / "llama")}})
    m = prep.cfg.model
    assert (m.ffn_hidden, m.rope_theta, m.norm_eps, m.tie_embeddings, m.vocab_size) == (160, 20000.0, 1e-5, False,
                                                                                        prep.vocab_size)
    assert m.init_from == str((tmp_path / "llama").resolve())


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"dim": 128}}, "model.dim is 128 but {path}/config.json has 64; leave model.dim unset"),
    ({"model": {"tie_embeddings": True}}, "model.tie_embeddings is True but {path}/config.json has False"),
    ({"variants": [{"name": "a", "attention": "standard", "model": {"n_kv_heads": 4}}]},
     "variants[0] (a).model.n_kv_heads is 4 but {path}/config.json has 2"),
])
def test_a_set_field_that_disagrees_is_named(tmp_path, overrides, message):
    tiny_llama(tmp_path / "llama")
    overrides = {**overrides, "model": {"init_from": str(tmp_path / "llama"), **overrides.get("model", {})}}
    with pytest.raises(UsageError) as e:
        _prepare(tmp_path, overrides)
    assert message.format(path=(tmp_path / "llama").resolve()) in str(e.value)
    assert str(tmp_path / "c.yaml") in str(e.value)


def _break(path, what):
    if what == "model_type":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (path / "config.json").write_text(json.dumps(cfg))
    elif what == "tensor":
        from safetensors.torch import load_file, save_file

        t = load_file(str(path / "model.safetensors"))
        del t["model.layers.1.mlp.up_proj.weight"]
        save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    elif what == "extra layer":
        cfg = json.loads((path / "config.json").read_text())
        cfg["num_hidden_layers"] = 1
        (path / "config.json").write_text(json.dumps(cfg))
    elif what == "shape":
        cfg = json.loads((path / "config.json").read_text())
        cfg["num_key_value_heads"] = 1
        (path / "config.json").write_text(json.dumps(cfg))
    elif what == "config":
        (path / "config.json").unlink()
    elif what in ("int8", "bool"):  # right names and shapes, values a float model would cast silently
        from safetensors.torch import load_file, save_file

        t = load_file(str(path / "model.safetensors"))
        name = "model.layers.0.mlp.up_proj.weight"
        t[name] = t[name].to(torch.int8) if what == "int8" else t[name] > 0
        save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("what, message", [
    ("model_type", "config.json: model_type 'gpt2', expected 'llama'"),
    ("tensor", ": missing tensor model.layers.1.mlp.up_proj.weight"),
    ("extra layer", ": unexpected tensor model.layers.1."),
    ("shape", ": tensor model.layers.0.self_attn.k_proj.weight has shape [32, 64], the config implies [16, 64]"),
    ("config", "config.json: missing (expected a Hugging Face Llama checkpoint)"),
    ("int8", "model.safetensors: tensor model.layers.0.mlp.up_proj.weight has dtype I8; expected floating point"),
    ("bool", "model.safetensors: tensor model.layers.0.mlp.up_proj.weight has dtype BOOL; expected floating point"),
])
def test_not_a_llama_checkpoint_is_refused_before_launch(tmp_path, what, message):
    tiny_llama(tmp_path / "llama")
    _break(tmp_path / "llama", what)
    with pytest.raises(UsageError) as e:
        _prepare(tmp_path, {"model": {"init_from": str(tmp_path / "llama")}})
    assert f"model.init_from: {(tmp_path / 'llama').resolve()}" in str(e.value) and message in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_a_checkpoint_vocab_smaller_than_the_data_is_refused(tmp_path):
    tiny_llama(tmp_path / "llama", vocab_size=300)
    with pytest.raises(UsageError, match="model.vocab_size 300 is smaller than the tokenizer's vocab"):
        _prepare(tmp_path, {"model": {"init_from": str(tmp_path / "llama")}})


def test_saved_run_config_resumes_with_the_same_shapes(tmp_path):
    """The config a run saves (shapes filled in) passes the check again under --resume."""
    tiny_llama(tmp_path / "llama")
    prep = _prepare(tmp_path, {"model": {"init_from": str(tmp_path / "llama")}})
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(prep.cfg.model_dump(mode="json")))
    again = prepare(TrainOptions(config_file=str(saved), output_dir=str(tmp_path / "runs")))
    assert again.cfg.model == prep.cfg.model


def test_nan_weights_fail_the_worker_that_loads_them_without_retries(tmp_path):
    """The driver reads only shapes; the worker reads the weights and refuses NaN ones as a
    config error (not retried) instead of training NaN from step 1."""
    from trainer import failures, hf_checkpoint
    from trainer.model_args import ModelArgs

    model = tiny_llama(tmp_path)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    args = ModelArgs(max_seq_len=32, **hf_checkpoint.model_fields(tmp_path))
    with pytest.raises(ValueError) as e:
        hf_checkpoint.load_state_dict(tmp_path, args)
    assert str(e.value) == (f"{tmp_path}: NaN or infinite values in model.layers.1.mlp.down_proj.weight; "
                            "these weights cannot be trained from")
    assert failures.classify(e.value).kind == "config"


def test_an_init_from_symlink_loop_is_a_usage_error_naming_the_path(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UsageError, match=f"model.init_from: {tmp_path / 'a'}: symlink loop$"):
        _prepare(tmp_path, {"model": {"init_from": str(tmp_path / "a")}})


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_resume_needs_no_init_from_directory_where_a_checkpoint_holds_the_weights(tmp_path, with_checkpoint):
    """Was refused whatever the checkpoints held (issue 32); without one, the weights are nowhere."""
    import shutil

    from orchestrator.run import effective_options

    tiny_llama(tmp_path / "llama")
    prep = _prepare(tmp_path, {"model": {"init_from": str(tmp_path / "llama")}})
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(prep.cfg.model_dump(mode="json")))
    (run / "options.json").write_text("{}")
    if with_checkpoint:
        (run / prep.variants[0].name / "checkpoints" / "checkpoint_00000003").mkdir(parents=True)
    shutil.rmtree(tmp_path / "llama")
    opts, _ = effective_options(TrainOptions(resume=str(run)))
    if with_checkpoint:
        assert prepare(opts).cfg.model == prep.cfg.model
    else:
        with pytest.raises(UsageError, match=f"model.init_from: {tmp_path / 'llama'}: "):
            prepare(opts)
