"""``export`` and ``generate`` on run directories laid out as ``train`` leaves them (``dcp/``
checkpoints, and those of ddp's earlier layout: the model in ``state.pt``), built in-process; the
bad inputs of issue 13.
The end-to-end run through Ray is in test_hf_ray.py."""

import json

import pytest
import torch
import yaml

from orchestrator import preprocess, trained
from orchestrator.cli import main
from trainer import checkpoint, dataset as dataset_mod
from trainer.attention import standard_attention
from trainer.config import ModelConfig
from trainer.model import Transformer

transformers = pytest.importorskip("transformers")

MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 20000.0}
SEQ = 32


def _vocab() -> int:
    return dataset_mod.load_dataset(preprocess.embedded_dataset()).vocab_size


def fake_run(tmp_path, *, layout="dcp", steps=(3, 6), model=None, data_path=None):
    """A run directory of one variant ('standard') with a checkpoint at each of ``steps``;
    returns it and the model of each step."""
    run = tmp_path / "run"
    run.mkdir()
    model_cfg = {**MODEL, **(model or {})}
    cfg = {"model": model_cfg, "train": {"seq_len": SEQ}, "data": {"path": data_path}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "options.json").write_text(json.dumps({"disable_flash_attn": True, "run_both_models": False}))
    args = ModelConfig(**model_cfg).args(vocab_size=_vocab(), max_seq_len=SEQ)
    models = {}
    for step in steps:
        torch.manual_seed(step)
        m = Transformer(args, standard_attention).eval()
        d = run / "standard" / checkpoint.STORAGE_NAME / f"checkpoint_{step:08d}"
        d.mkdir(parents=True)
        if layout == "legacy":  # ddp's earlier layout: model and optimizer beside the progress in state.pt
            checkpoint.write(d, 0, {"model": m.state_dict(), "optimizer": {}, "step": step})
        else:  # model and optimizer in one DCP directory, the progress alone in state.pt
            optim = {"state": {"layers.0.attn.wq.weight": {"exp_avg": torch.randn(64, 64)}}}
            checkpoint.write(d, 0, {"step": step}, sharded={"model": m.state_dict(), "optimizer": optim})
        models[step] = m
    return run, models


def _ids():
    return torch.randint(0, 2000, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _assert_same_logits(out_dir, ours):
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(_ids()).logits, ours(_ids()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["legacy", "dcp"])
def test_export_of_the_newest_checkpoint_loads_in_transformers_with_our_logits(tmp_path, capsys, layout):
    run, models = fake_run(tmp_path, layout=layout)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported variant standard at step 6 ({run}/standard/checkpoints/checkpoint_00000006" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "generation_config.json"])
    _assert_same_logits(out, models[6])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = preprocess.Tokenizer.of_dataset(dataset_mod.load_dataset(preprocess.embedded_dataset()))
    text = "def f(x):\n    return x + 1  # the sum"
    assert tok(text).input_ids == ours.encode(text)
    assert tok.eos_token_id == ours.eos_id == json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_step_chooses_an_older_checkpoint_and_a_corrupt_newest_is_skipped(tmp_path):
    run, models = fake_run(tmp_path)
    assert main(["export", str(run), "--step", "3", "--output-dir", str(tmp_path / "s3")]) == 0
    _assert_same_logits(tmp_path / "s3", models[3])
    newest = run / "standard" / "checkpoints" / "checkpoint_00000006" / checkpoint.STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])
    assert trained.load(run).step == 3


def test_tied_head_and_sentencepiece_tokenizer_export(tmp_path):
    sp = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the quick brown fox jumps over dog number {i}" for i in range(300)))
    sp.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                  model_type="bpe", minloglevel=2)
    preprocess.preprocess([corpus], tmp_path / "ds", tmp_path / "sp.model")
    # fake_run sizes the model by the embedded dataset; this one needs the SentencePiece vocab.
    run, models = fake_run(tmp_path, model={"tie_embeddings": True, "vocab_size": 60}, data_path=str(tmp_path / "ds"))
    out = tmp_path / "hf"
    assert main(["export", str(run), "--output-dir", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings
    ids = torch.randint(0, 60, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, models[6](ids), rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = preprocess.Tokenizer.of_dataset(dataset_mod.load_dataset(tmp_path / "ds"))
    for text in ["the quick brown fox", "  jumps over\ndog number 17 "]:
        assert tok(text).input_ids == ours.encode(text)


def test_generate_prints_the_prompt_and_a_continuation(tmp_path, capsys):
    run, _ = fake_run(tmp_path)
    args = ["generate", str(run), "--prompt", "def main", "--max-new-tokens", "5", "--device", "cpu"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("def main") and len(greedy.strip()) > len("def main")
    assert main(args) == 0 and capsys.readouterr().out == greedy  # greedy is deterministic
    sampled = [main(args + ["--temperature", "1.0", "--seed", str(s)]) or capsys.readouterr().out for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _fails(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for text in expected:
        assert text in err, err
    return err


def test_no_usable_checkpoint(tmp_path, capsys):
    run, _ = fake_run(tmp_path, steps=(3,))
    state = run / "standard" / "checkpoints" / "checkpoint_00000003" / checkpoint.STATE_FILE
    state.write_bytes(b"truncated")
    _fails(capsys, ["export", str(run), "--output-dir", str(tmp_path / "out")],
           f"{run}/standard/checkpoints: no usable checkpoint")
    assert not (tmp_path / "out").exists()
    _fails(capsys, ["export", str(run), "--step", "4", "--output-dir", str(tmp_path / "out")],
           "checkpoint_00000004: no checkpoint at step 4 (steps saved: 3)")
    _fails(capsys, ["generate", str(run), "--prompt", "x"], "no usable checkpoint")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_a_temperature_that_is_not_zero_or_a_finite_positive_number(tmp_path, capsys, value):
    """nan was exit 1 from inside the sampler (issue 32)."""
    run, _ = fake_run(tmp_path, steps=(3,))
    _fails(capsys, ["generate", str(run), "--prompt", "x", "--temperature", value],
           f"--temperature {value}: must be 0 (greedy) or a finite positive number")


def test_unknown_variant_and_missing_run(tmp_path, capsys):
    run, _ = fake_run(tmp_path, steps=(3,))
    _fails(capsys, ["export", str(run), "--variant", "flash", "--output-dir", str(tmp_path / "out")],
           f"{run}: no variant 'flash'; the run has standard")
    _fails(capsys, ["export", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")],
           f"{tmp_path / 'nope'}: run directory not found")
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_needs_force_which_replaces_an_earlier_export(tmp_path, capsys):
    run, models = fake_run(tmp_path, steps=(3,))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    _fails(capsys, ["export", str(run), "--output-dir", str(out)],
           f"{out}: output directory is not empty; choose a new one or pass --force")
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00002.safetensors", "notes.txt"]
    assert main(["export", str(run), "--output-dir", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and not (out / "model-00001-of-00002.safetensors").exists()
    _assert_same_logits(out, models[3])


def test_a_vocab_padded_past_the_tokenizer_exports_its_padded_rows_and_generates(tmp_path, capsys):
    """configs/llama-0.95b.yaml pads the vocab (32,000 rows for a 2,048-token tokenizer); the
    export keeps every row, as HF checkpoints do, and generate never picks a padded row."""
    vocab, padded = _vocab(), 2 * _vocab()
    run, models = fake_run(tmp_path, steps=(3,), model={"vocab_size": padded})
    model = models[3]
    with torch.no_grad():  # padded rows that would win every argmax if generate considered them
        model.output.weight[vocab:] = 10 * model.output.weight[:padded - vocab]
    d = run / "standard" / checkpoint.STORAGE_NAME / "checkpoint_00000006"
    d.mkdir()
    checkpoint.write(d, 0, {"model": model.state_dict(), "optimizer": {}, "step": 6})
    assert main(["export", str(run), "--output-dir", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == padded
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "out")) == vocab
    _assert_same_logits(tmp_path / "out", model)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "def main", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def main") and len(text.strip()) > len("def main")


def test_a_tokenizer_smaller_than_a_vocab_taken_from_the_data_is_another_tokenizer(tmp_path, capsys):
    run, _ = fake_run(tmp_path, steps=(3,), model={"vocab_size": _vocab() + 64})
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["model"]["vocab_size"]  # null: the model's vocab was the data's, so the tokenizer changed since
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    data = preprocess.embedded_dataset()
    _fails(capsys, ["export", str(run), "--output-dir", str(tmp_path / "out")],
           f"{data}: tokenizer vocab {_vocab()} is smaller than the model's vocab {_vocab() + 64}")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_nan_weights_is_refused_and_an_earlier_step_exports(tmp_path, capsys):
    """A diverged run saved NaN weights before issue 32: export wrote them with exit 0."""
    run, models = fake_run(tmp_path, steps=(3,))
    state = {k: v.clone() for k, v in models[3].state_dict().items()}
    state["layers.0.attn.wq.weight"][0, 0] = float("nan")
    state["layers.1.mlp.w2.weight"][1, 2] = float("-inf")
    ruined = run / "standard" / checkpoint.STORAGE_NAME / "checkpoint_00000006"
    ruined.mkdir()
    checkpoint.write(ruined, 0, {"model": state, "optimizer": {}, "step": 6})
    out = tmp_path / "out"
    _fails(capsys, ["export", str(run), "--output-dir", str(out)],
           f"{ruined}: NaN or infinite values in layers.0.attn.wq.weight, layers.1.mlp.w2.weight; "
           "export an earlier checkpoint with --step")
    assert not out.exists()
    assert main(["export", str(run), "--step", "3", "--output-dir", str(out)]) == 0
    _assert_same_logits(out, models[3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generate_on_the_gpu_gives_the_cpu_text(tmp_path, capsys):
    run, _ = fake_run(tmp_path)
    args = ["generate", str(run), "--prompt", "def main", "--max-new-tokens", "8"]
    assert main(args + ["--device", "cpu"]) == 0
    cpu = capsys.readouterr().out
    assert main(args + ["--device", "cuda"]) == 0
    assert capsys.readouterr().out == cpu


def test_an_export_onto_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Was exit 1 with safetensors' raw SafetensorError (issue 32). The disk fills in the middle of
    the weights; the error is the one safetensors' writer gives for ENOSPC."""
    import safetensors
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    run, _ = fake_run(tmp_path, steps=(3,))
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    _fails(capsys, ["export", str(run), "--output-dir", str(tmp_path / "out")],
           f"error: {tmp_path / 'out'}: no space left on device; the export needs about ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial export, no staging left


def test_generate_writes_only_the_text_to_stdout_and_its_log_lines_to_stderr(tmp_path, capsys, monkeypatch):
    """`generate ... | next-tool` gets the text alone, even when the command logs (here: building
    the embedded dataset in an empty cache)."""
    run, _ = fake_run(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert main(["generate", str(run), "--prompt", "def main", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def main") and len(out.splitlines()) == 1
    assert "built the embedded dataset" in err
