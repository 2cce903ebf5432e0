"""Config errors name the file, the key, the value and what is expected."""

import pytest
import yaml

from orchestrator import config
from orchestrator.errors import UsageError
from trainer.config import ModelConfig


def _load(tmp_path, content: str | bytes):
    p = tmp_path / "c.yaml"
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return config.load(p)


@pytest.mark.parametrize("content,expected", [
    ("train: {lr: [1, 2", "malformed YAML at line"),
    ("- a\n- b\n", "expected a mapping of sections"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a text file"),
    ("train: {learning_rate: 0.1}", "unknown key 'train.learning_rate'; valid keys: seq_len,"),
    ("bogus: 1", "unknown key 'bogus'; valid keys: model, train, scaling, data, attention, variants"),
    ("train: {max_steps: ten}", "train.max_steps: Input should be a valid integer"),
    ("train: {lr: -0.1}", "train.lr: Input should be greater than 0 (got -0.1)"),
    ("model: {dim: 100, n_heads: 3}", "dim (100) must be divisible by n_heads (3)"),
    ("model: {n_heads: 6, n_kv_heads: 4}", "n_heads (6) must be divisible by n_kv_heads (4)"),
    ("scaling: {num_workers: 0}", "scaling.num_workers: Input should be greater than 0"),
    ("attention: fast", "attention: Input should be 'flash' or 'standard'"),
    ("train: {compile: maybe}", "train.compile: Input should be 'auto' or a valid boolean"),
    ("train: {compile: \"off\"}", "train.compile: Input should be 'auto' or a valid boolean"),
    ("model: {tie_embeddings: 1}", "model.tie_embeddings: Input should be a valid boolean"),
    # One strict rule for every key (issue 32): these were true, 1 and 10.
    ("scaling: {use_gpu: \"yes\"}", "scaling.use_gpu: Input should be 'auto' or a valid boolean (got 'yes')"),
    ("train: {max_steps: true}", "train.max_steps: Input should be a valid integer (got True)"),
    ("train: {max_steps: 10.0}", "train.max_steps: Input should be a valid integer (got 10.0)"),
    ("train: {micro_batch_size: \"2\"}", "train.micro_batch_size: Input should be 'auto' or a valid integer (got '2')"),
    ("scaling: {placement_timeout_s: .inf}", "scaling.placement_timeout_s: Input should be a finite number (got inf)"),
    ("train: {lr: .nan}", "train.lr: Input should be a finite number (got nan)"),
    ("train: {weight_decay: .inf}", "train.weight_decay: Input should be a finite number (got inf)"),
    ("train: {activation_checkpointing: 0}", "train.activation_checkpointing: Input should be false, true or a whole number N >= 1 (checkpoint every Nth block) (got 0)"),
    ("train: {activation_checkpointing: -1}", "train.activation_checkpointing: Input should be false, true or a whole number N >= 1 (checkpoint every Nth block) (got -1)"),
    ("train: {activation_checkpointing: 1.5}", "train.activation_checkpointing: Input should be false, true or a whole number N >= 1 (checkpoint every Nth block) (got 1.5)"),
    ("train: {activation_checkpointing: 2.0}", "train.activation_checkpointing: Input should be false, true or a whole number N >= 1 (checkpoint every Nth block) (got 2.0)"),
    ("train: {activation_checkpointing: \"yes\"}", "train.activation_checkpointing: Input should be false, true or a whole number N >= 1 (checkpoint every Nth block) (got 'yes')"),
    ("train: {activation_checkpointing: \"2\"}", "train.activation_checkpointing: Input should be false, true or a whole number N >= 1 (checkpoint every Nth block) (got '2')"),
    ("train: {activation_checkpointing: null}", "train.activation_checkpointing: Input should be false, true or a whole number N >= 1 (checkpoint every Nth block) (got None)"),
    ("variants: [{name: a, attention: flash}, {name: a, attention: standard}]", "duplicate variant name(s): a"),
    ("variants: [{name: a, attention: flash, train: {lr: 0}}]", "variants[0] (a).train: lr: Input should be greater than 0"),
    ("variants: [{name: a, attention: flash, model: {depth: 3}}]", "variants[0] (a).model"),
])
def test_bad_config_is_one_clear_error_naming_file_and_key(tmp_path, content, expected):
    with pytest.raises(UsageError) as e:
        _load(tmp_path, content)
    assert str(e.value).startswith(str(tmp_path / "c.yaml") + ": ")
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value,stored,every", [("false", False, 0), ("true", True, 1), ("1", True, 1),
                                               ("2", 2, 2), ("4", 4, 4)])
def test_activation_checkpointing_is_false_true_or_every_nth_block(tmp_path, value, stored, every):
    train = _load(tmp_path, f"train: {{activation_checkpointing: {value}}}").train
    # false stays false (not 0, which is refused) and 1 is true: one value per setting.
    assert train.activation_checkpointing == stored and type(train.activation_checkpointing) is type(stored)
    args = ModelConfig().args(vocab_size=10, max_seq_len=8, activation_checkpointing=train.activation_checkpointing)
    assert args.activation_checkpointing == every  # the model's every-Nth, 0 for none
    with pytest.raises(ValueError, match="activation_checkpointing"):
        train.activation_checkpointing = 0  # assignment is validated too


def test_missing_config_file_and_directory_are_named(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    with pytest.raises(UsageError, match="is a directory"):
        config.load(tmp_path)


def test_empty_file_is_the_built_in_default(tmp_path):
    assert _load(tmp_path, "") == config.RunConfig()


def test_built_in_default_round_trips_through_yaml(tmp_path):
    dumped = yaml.safe_dump(config.RunConfig().model_dump(mode="json"))
    assert _load(tmp_path, dumped) == config.RunConfig()


def test_variants_run_both_and_disable_flash():
    cfg = config.RunConfig()
    assert [(v.name, v.attention) for v in config.variant_configs(cfg, False, False)] == [("flash", "flash")]
    assert [(v.name, v.attention) for v in config.variant_configs(cfg, False, True)] == [("standard", "standard")]
    both = config.variant_configs(cfg, True, False)
    assert [(v.name, v.attention) for v in both] == [("flash", "flash"), ("standard", "standard")]
    # With flash attention disabled the pair stays a pair: the planner switches each to standard.
    assert [(v.name, v.attention) for v in config.variant_configs(cfg, True, True)] == [
        ("flash", "flash"), ("standard", "standard")]


def test_run_both_models_runs_the_configs_two_model_variants_and_refuses_three():
    two = config.validate({"variants": [{"name": "baseline", "attention": "flash"},
                                        {"name": "deeper", "attention": "flash", "model": {"n_layers": 6}}]})
    assert [v.name for v in config.variant_configs(two, True, True, "two.yaml")] == ["baseline", "deeper"]
    three = config.validate({"variants": [{"name": n, "attention": "flash"} for n in ("a", "b", "c")]})
    with pytest.raises(UsageError, match=r"^three.yaml: --run-both-models runs the config's two variants, but "
                                         r"'variants' lists 3 \(a, b, c\)"):
        config.variant_configs(three, True, False, "three.yaml")


def test_variant_overrides_apply_to_their_variant_only():
    cfg = config.validate({"variants": [{"name": "big", "attention": "flash", "model": {"dim": 256, "n_heads": 8}},
                                        {"name": "base", "attention": "standard"}]})
    big, base = (config.resolved_sections(cfg, v)[0] for v in cfg.variants)
    assert (big.dim, big.n_heads, base.dim) == (256, 8, cfg.model.dim)


def test_cli_overrides_are_validated_too():
    with pytest.raises(UsageError, match="train.max_steps: Input should be greater than 0"):
        config.with_overrides(config.RunConfig(), "built-in config", train={"max_steps": 0})


def test_set_changes_keys_of_the_file_with_yaml_typed_values(tmp_path):
    (tmp_path / "c.yaml").write_text("train: {max_steps: 7, lr: 0.01}\n")
    cfg = config.load(tmp_path / "c.yaml", ["train.lr=3e-4", "model.dim=128", "model.n_heads=4",
                                            "scaling.num_workers=1", "scaling.label_selector.zone=a"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.model.dim, cfg.model.n_heads) == (3e-4, 7, 128, 4)
    assert (cfg.scaling.num_workers, cfg.scaling.label_selector) == (1, {"zone": "a"})
    assert config.load(None, ["attention=standard"]).attention == "standard"
    assert cfg.model.model_fields_set == {"dim", "n_heads"}  # the rest still defaults (model.init_from tells them apart)


@pytest.mark.parametrize("settings,expected", [
    (["train.learning_rate=0.1"], "--set train.learning_rate=0.1: unknown key 'train.learning_rate'; valid keys: seq_len,"),
    (["trian.lr=0.1"], "--set trian.lr=0.1: unknown key 'trian'; valid keys: model, train, scaling, data, attention, variants"),
    (["train.lr=fast"], "--set train.lr=fast: train.lr: Input should be a valid number"),
    (["train.lr=1", "train.max_steps=ten"], "--set train.max_steps=ten: train.max_steps: Input should be a valid integer"),
    (["scaling.num_workers=0"], "--set scaling.num_workers=0: scaling.num_workers: Input should be greater than 0 or 'auto'"),
    (["model.dim=128", "train.lr=1"], "--set model.dim=128: model: dim (128) must be divisible by n_heads (6)"),
    (["train.lr"], "--set train.lr: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4"),
    (["attention.x=1"], "--set attention.x=1: attention: Input should be 'flash' or 'standard'"),
    (["train.lr=[1"], "--set train.lr=[1: malformed YAML value"),
])
def test_a_bad_set_is_one_error_naming_the_setting_and_the_key(settings, expected):
    with pytest.raises(UsageError) as e:
        config.load(None, settings)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_a_set_changes_only_the_section_it_names_not_one_a_yaml_alias_shares(tmp_path):
    (tmp_path / "c.yaml").write_text("train: &base {lr: 0.01}\n"
                                     "variants: [{name: a, attention: flash, train: *base}]\n")
    cfg = config.load(tmp_path / "c.yaml", ["train.lr=0.5"])
    assert cfg.train.lr == 0.5 and cfg.variants[0].train == {"lr": 0.01}


def test_a_number_in_exponent_form_is_a_number_as_in_yaml_1_2(tmp_path):
    """PyYAML (YAML 1.1) reads 3e-4 as a string, which the strict config rule would refuse."""
    cfg = _load(tmp_path, "train: {lr: 3e-3, min_lr: 1E-4}")
    assert (cfg.train.lr, cfg.train.min_lr) == (3e-3, 1e-4)
