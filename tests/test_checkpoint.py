"""Checkpoints on disk, without Ray: a corrupt or partial one is detected and the previous one used."""

import json
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.save_restore import restore


def _save(storage, step: int, world: int = 2) -> Path:
    d = storage / f"checkpoint_{step:08d}"
    d.mkdir(parents=True)
    for rank in range(world):
        state = {"step": step, "model": {"w": torch.full((4,), float(step))},
                 "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1).state_dict()} if rank == 0 else None
        checkpoint.write(d, rank, state, world)
    return d


@pytest.fixture
def storage(tmp_path):
    s = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        _save(s, step)
    return s


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [
    pytest.param(lambda d: _truncate(d / "state.pt"), id="truncated-state"),
    pytest.param(lambda d: (d / "state.pt").unlink(), id="missing-state"),
    pytest.param(lambda d: (d / "manifest_rank0.json").write_text("{not json"), id="broken-manifest"),
    pytest.param(lambda d: (d / "manifest_rank1.json").unlink(), id="rank-1-never-finished"),
    pytest.param(lambda d: _truncate(d / "rng_rank1.pt"), id="truncated-rng-of-rank-1"),
])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(storage, damage):
    damage(storage / "checkpoint_00000009")
    assert checkpoint.newest_usable(storage, storage / "checkpoint_00000009") == storage / "checkpoint_00000006"
    with pytest.raises(checkpoint.CorruptCheckpoint):
        checkpoint.verify(storage / "checkpoint_00000009")


def test_resume_reads_the_previous_checkpoint_when_the_latest_is_corrupt(storage):
    _truncate(storage / "checkpoint_00000009" / "state.pt")
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    got = restore(storage, storage / "checkpoint_00000009", rank=0, world=1, device=torch.device("cpu"),
                  model=model, optimizer=optimizer, strategy="ddp")
    assert got.path.name == "checkpoint_00000006" and got.step == 6
    assert torch.equal(model.w.detach(), torch.full((4,), 6.0))
    assert got.skipped and got.skipped[0].startswith("checkpoint_00000009")


def test_a_complete_upload_newer_than_rays_latest_is_used(storage):
    """A crash after every rank uploaded step 9 but before Ray registered it costs nothing."""
    assert checkpoint.newest_usable(storage, storage / "checkpoint_00000006") == storage / "checkpoint_00000009"


def test_no_usable_checkpoint_is_an_error_when_ray_committed_one_and_a_fresh_start_otherwise(tmp_path, storage):
    for d in storage.glob("checkpoint_*"):
        _truncate(d / "state.pt")
    with pytest.raises(checkpoint.CorruptCheckpoint, match="no usable checkpoint"):
        checkpoint.newest_usable(storage, storage / "checkpoint_00000009")
    assert checkpoint.newest_usable(storage, None) is None
    assert checkpoint.newest_usable(tmp_path / "nothing-yet", None) is None


def test_each_rank_reads_its_own_rng_state(storage):
    _, rng0 = checkpoint.read(storage / "checkpoint_00000003", 0)
    _, rng1 = checkpoint.read(storage / "checkpoint_00000003", 1)
    _, rng_new = checkpoint.read(storage / "checkpoint_00000003", 2)  # a rank that did not exist then
    assert rng0 is not None and rng1 is not None and rng_new is None


def test_unregistered_uploads_older_than_rays_latest_are_pruned(storage):
    _save(storage, 12)
    (storage / checkpoint.SNAPSHOT_FILE).write_text(json.dumps({
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000003"},
                               {"checkpoint_dir_name": "checkpoint_00000009"}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000009"},
    }))
    checkpoint.prune_unregistered(storage)
    assert sorted(p.name for p in checkpoint.checkpoint_dirs(storage)) == [
        "checkpoint_00000003", "checkpoint_00000009", "checkpoint_00000012"]
