"""Models in and out, end to end on Ray (CPU, two workers): a trained run exported and loaded by
transformers with our logits, generate on it, and training that starts from a Hugging Face
Llama at exactly that model's loss."""

import pytest
import torch
import torch.nn.functional as F

from orchestrator import preprocess, trained
from orchestrator.cli import main
from orchestrator.config import DataConfig
from orchestrator.run import TrainOptions, train
from tests.conftest import TINY, write_config
from tests.test_init_from import tiny_llama
from trainer import dataset as dataset_mod, evaluate
from trainer.attention import standard_attention
from trainer.model import Transformer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.ray


def _train(tmp_path, name, overrides):
    cfg = write_config(tmp_path / f"{name}.yaml", overrides)
    rec = train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name)).variants["flash"].model_dump()
    assert rec["status"] == "succeeded", rec.get("error")
    return rec


def first_step_loss(hf_model, val_path: str | None = None) -> float:
    """The loss the run's first step must report: the model's mean loss over the first
    micro-batch of each of the two ranks (the worker's sampler, seed and windows)."""
    ds = dataset_mod.load_dataset(preprocess.embedded_dataset())
    tc = TINY["train"]
    # The worker samples only the training windows: a held-out tail (data.val_fraction's default
    # without data.val_path) is never drawn.
    held_out = DataConfig(val_path=val_path).held_out_fraction
    n_train, _ = evaluate.split(ds, tc["seq_len"], val_fraction=held_out, val_path=val_path)
    sampler = dataset_mod.BatchSampler(seed=1337, n_windows=n_train,
                                    micro_batch=tc["micro_batch_size"], grad_accum=1, world_size=2)
    losses = []
    with torch.no_grad():
        for rank in range(2):
            x, y = dataset_mod.get_batch(ds.tokens, sampler.indices(0, 0, rank), tc["seq_len"])
            logits = hf_model(torch.from_numpy(x)).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten()).item())
    return sum(losses) / 2


def test_init_from_a_transformers_llama_starts_at_its_loss_then_trains(ray_session, tmp_path):
    hf = tiny_llama(tmp_path / "llama", seed=5)  # GQA (4 heads, 2 kv), untied, its own rope theta and eps
    rec = _train(tmp_path, "from-hf", {"model": {"init_from": str(tmp_path / "llama")}})
    assert rec["first_loss"] == pytest.approx(first_step_loss(hf), rel=1e-5)
    assert rec["final_loss"] < rec["first_loss"] - 0.1


def test_trained_run_exports_to_transformers_generates_and_trains_on_from_the_export(ray_session, tmp_path, capsys):
    _train(tmp_path, "tiny", {"model": {"tie_embeddings": False}})
    run = tmp_path / "runs" / "tiny"
    out = tmp_path / "hf"
    assert main(["export", str(run), "--output-dir", str(out)]) == 0
    assert "exported variant flash at step 6" in capsys.readouterr().out

    ours_src = trained.load(run)
    ours = Transformer(ours_src.args, standard_attention).eval()
    ours.load_state_dict(ours_src.state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours_src.args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)

    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("The") and len(text.strip()) > 3

    # Round trip: training from the export starts at the exported model's loss.
    rec = _train(tmp_path, "again", {"model": {"init_from": str(out)}, "train": {"max_steps": 3}})
    assert rec["first_loss"] == pytest.approx(first_step_loss(hf), rel=1e-5)


def test_resume_without_the_init_from_directory_restores_the_checkpoint_and_a_worker_with_none_fails_at_once(
        ray_session, tmp_path):
    """--resume needs no init_from directory where a checkpoint holds the weights (issue 32); a
    worker that finds no usable checkpoint then fails at once naming init_from, instead of
    training on from random weights."""
    import shutil

    tiny_llama(tmp_path / "llama", seed=5)
    cfg = write_config(tmp_path / "r.yaml", {
        "model": {"init_from": str(tmp_path / "llama")},
        "train": {"max_steps": 4, "checkpoint_every": 2, "fault": {"rank": 0, "step": 3}},
        "scaling": {"num_workers": 1, "max_failures": 0}})
    run = tmp_path / "runs" / "r"
    assert train(TrainOptions(config_file=str(cfg), output_dir=str(run.parent), name="r")).variants["flash"].status == "failed"
    shutil.copytree(run, tmp_path / "copy")
    shutil.rmtree(tmp_path / "llama")

    rec = train(TrainOptions(resume=str(run))).variants["flash"]
    assert (rec.status, rec.steps) == ("succeeded", 4), rec.error

    # The same stopped run, its checkpoint's weights gone: nothing holds them any more.
    for shard in (tmp_path / "copy" / "flash" / "checkpoints").glob("checkpoint_*/*"):
        if shard.name.startswith(("state", "dcp")):
            shard.unlink() if shard.is_file() else shutil.rmtree(shard)
    rec = train(TrainOptions(resume=str(tmp_path / "copy"))).variants["flash"]
    assert (rec.status, rec.restarts) == ("failed", 0), rec
    assert f"model.init_from {tmp_path / 'llama'}: not found, and no checkpoint holds the weights" in rec.error
