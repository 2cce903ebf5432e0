"""FSDP2 on two CPU workers over gloo, through the real Ray Train path: the same losses and
held-out losses as DDP, sharded checkpoints written by every rank, a SIGKILLed worker resumed
from them to the clean run's losses; and the disk and corrupt-checkpoint faults of the worker's
checkpointing (issue 18), under DDP, and a checkpoint with planted code (issue 32) under both;
DDP's checkpoints are DCP too (issue 30)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from trainer import checkpoint
from trainer.metrics import read_attempts, read_metrics

pytestmark = pytest.mark.ray

EVERY, STEPS = 3, 9
BASE = {"train": {"max_steps": STEPS, "checkpoint_every": EVERY, "eval_every": EVERY}}
FSDP = {**BASE, "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2, "strategy": "fsdp"}}


def _train(tmp_path: Path, name: str, overrides: dict, **opts) -> dict:
    cfg = write_config(tmp_path / f"{name}.yaml", overrides)
    return train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name, **opts)).model_dump()


def _losses(vdir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(vdir / "metrics.jsonl")]


def _val_losses(vdir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(vdir / "metrics.jsonl") if "val_loss" in r}


def _attempts(vdir: Path) -> list[dict]:
    return read_attempts(vdir)


@pytest.fixture(scope="module")
def ddp_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    rec = _train(tmp, "ddp", BASE)["variants"]["flash"]
    assert rec["status"] == "succeeded" and rec["strategy"] == "ddp", rec
    return tmp / "runs" / "ddp" / "flash"


@pytest.fixture(scope="module")
def fsdp_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    rec = _train(tmp, "fsdp", FSDP)["variants"]["flash"]
    assert rec["status"] == "succeeded" and rec["restarts"] == 0, rec
    return tmp / "runs" / "fsdp" / "flash", rec


def test_fsdp_and_ddp_with_the_same_seed_give_the_same_losses(ddp_run, fsdp_run):
    """Same initial weights (trainer/parallelize.py replays Transformer's init shard by shard)
    and the same batches; only the order of the gradient sums differs (reduce-scatter against
    all-reduce), so in fp32 the losses agree to float rounding: within 1e-5 relative."""
    vdir, rec = fsdp_run
    assert rec["strategy"] == "fsdp" and rec["num_workers"] == 2
    assert len(_losses(vdir)) == STEPS
    assert _losses(vdir) == pytest.approx(_losses(ddp_run), rel=1e-5)
    assert list(_val_losses(vdir)) == [EVERY, 2 * EVERY, STEPS]  # held-out loss, sharded over both workers
    assert _val_losses(vdir) == pytest.approx(_val_losses(ddp_run), rel=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_writes_its_own_shards_of_a_dcp_checkpoint(ddp_run, fsdp_run, strategy):
    """Under ddp too (one format, issue 30): DCP writes each replicated tensor once, spread over the ranks."""
    vdir = ddp_run if strategy == "ddp" else fsdp_run[0]
    dirs = checkpoint.checkpoint_dirs(vdir / checkpoint.STORAGE_NAME)
    assert dirs and dirs[0].name == f"checkpoint_{STEPS:08d}"
    for d in dirs:
        checkpoint.verify(d)
        dcp = d / checkpoint.DCP_DIR
        assert (dcp / ".metadata").is_file()
        for rank in (0, 1):
            assert list(dcp.glob(f"__{rank}_*.distcp")), f"rank {rank} wrote no shard in {d}"
            files = json.loads((d / f"manifest_rank{rank}.json").read_text())["files"]
            assert any(name.startswith(f"dcp/__{rank}_") for name in files)
        state = torch.load(d / checkpoint.STATE_FILE, weights_only=False)
        assert "model" not in state and state["world_size"] == 2  # rank 0 gathered nothing
    # The export path (no process group): full tensors under the model's own parameter names.
    weights = checkpoint.load_model_state_dict(dirs[0])
    assert weights["tok_embeddings.weight"].shape == (weights["tok_embeddings.weight"].shape[0], 64)
    assert "layers.1.mlp.w2.weight" in weights and all(t.device.type == "cpu" for t in weights.values())


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_a_worker_sigkilled_under_fsdp_resumes_from_the_sharded_checkpoint(ray_session, tmp_path, fsdp_run, asynchronous):
    """Written in the background (train.checkpoint_async, the default) or not, the checkpoint
    resumes to the clean run's losses: the same both ways."""
    vdir_clean, _ = fsdp_run
    overrides = {**FSDP, "train": {**FSDP["train"], "checkpoint_async": asynchronous,
                                   "fault": {"rank": 1, "step": EVERY + 2}}}
    rec = _train(tmp_path, "killed", overrides)["variants"]["flash"]
    vdir = tmp_path / "runs" / "killed" / "flash"
    assert rec["status"] == "succeeded" and rec["restarts"] == 1, rec
    assert _attempts(vdir)[-1]["start_step"] == EVERY
    assert _attempts(vdir)[-1]["restored_from"].endswith(f"checkpoint_{EVERY:08d}")
    got = read_metrics(vdir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == pytest.approx(_losses(vdir_clean), rel=1e-5)
    assert _val_losses(vdir) == pytest.approx(_val_losses(vdir_clean), rel=1e-5)  # the same held-out batches


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_newest_checkpoint_is_skipped_and_resume_runs_to_the_end(ray_session, tmp_path, ddp_run, caplog):
    """Issue 18, defect 1: flip a byte in the newest checkpoint of a failed run, then --resume.
    The run goes on from the previous checkpoint to the end, and says which one it skipped."""
    overrides = {**BASE, "train": {**BASE["train"], "fault": {"rank": 1, "step": 2 * EVERY + 2}},
                 "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0}}
    first = _train(tmp_path, "c", overrides)["variants"]["flash"]
    assert first["status"] == "failed", first
    run_dir, vdir = tmp_path / "runs" / "c", tmp_path / "runs" / "c" / "flash"
    newest = vdir / checkpoint.STORAGE_NAME / f"checkpoint_{2 * EVERY:08d}"
    _flip_a_byte(newest / checkpoint.STATE_FILE)

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        rec = train(TrainOptions(resume=str(run_dir))).variants["flash"].model_dump()
    assert rec["status"] == "succeeded" and rec["start_step"] == EVERY, rec
    assert f"skipped checkpoint {newest.name}, moved into" in caplog.text
    assert all(checkpoint.verifies(d) for d in checkpoint.checkpoint_dirs(vdir / checkpoint.STORAGE_NAME))
    assert _losses(vdir) == pytest.approx(_losses(ddp_run), rel=1e-5)
    assert list(_val_losses(vdir)) == [EVERY, 2 * EVERY, STEPS]  # held-out loss, sharded over both workers
    assert _val_losses(vdir) == pytest.approx(_val_losses(ddp_run), rel=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_payload_planted_in_every_pickled_file_of_the_newest_checkpoint_never_runs_on_resume(
        ray_session, tmp_path, ddp_run, fsdp_run, caplog, strategy):
    """Issue 32: whoever can write the run directory plants os.system in state.pt, every RNG
    file and DCP's .metadata, and re-hashes the manifests. --resume skips the checkpoint,
    says why, and goes on from the previous one to the clean run's losses; the code never runs."""
    from tests.test_safe_load import plant

    scaling = {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 0, "strategy": strategy}
    overrides = {**BASE, "train": {**BASE["train"], "fault": {"rank": 1, "step": 2 * EVERY + 2}}, "scaling": scaling}
    assert _train(tmp_path, "p", overrides)["variants"]["flash"]["status"] == "failed"
    run_dir, vdir = tmp_path / "runs" / "p", tmp_path / "runs" / "p" / "flash"
    newest = vdir / checkpoint.STORAGE_NAME / f"checkpoint_{2 * EVERY:08d}"
    marker = tmp_path / "pwned"
    pickled = [checkpoint.STATE_FILE, "rng_rank0.pt", "rng_rank1.pt", "dcp/.metadata"]
    for name in pickled:
        plant(newest, name, marker)

    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        rec = train(TrainOptions(resume=str(run_dir))).variants["flash"].model_dump()
    assert rec["status"] == "succeeded" and rec["start_step"] == EVERY, rec
    assert f"skipped checkpoint {newest.name}, moved into" in caplog.text and "refused, it holds more than plain data" in caplog.text
    assert not marker.exists()
    clean = ddp_run if strategy == "ddp" else fsdp_run[0]
    assert _losses(vdir) == pytest.approx(_losses(clean), rel=1e-5)


def test_a_full_disk_fails_once_with_a_clear_message_and_keeps_the_previous_checkpoint(ray_session, tmp_path):
    """Issue 18, defect 4, simulated: rank 1's write of the second checkpoint fails with ENOSPC."""
    overrides = {**BASE, "train": {**BASE["train"], "fault": {"kind": "enospc", "rank": 1, "step": 2 * EVERY}}}
    rec = _train(tmp_path, "full", overrides)["variants"]["flash"]
    storage = tmp_path / "runs" / "full" / "flash" / checkpoint.STORAGE_NAME
    assert rec["status"] == "failed" and rec["restarts"] == 0 and rec["failure_kind"] == "no_space", rec
    assert rec["error"].startswith("no space left on device: checkpoint ") and f"checkpoint_{2 * EVERY:08d}" in rec["error"]
    assert "needs about" in rec["error"]
    assert [d.name for d in checkpoint.checkpoint_dirs(storage)] == [f"checkpoint_{EVERY:08d}"]  # the partial one removed
    assert checkpoint.newest_usable(storage, storage / f"checkpoint_{EVERY:08d}").name == f"checkpoint_{EVERY:08d}"
