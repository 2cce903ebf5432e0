"""No code runs from a checkpoint (issue 32): a payload planted in any pickled file of a DCP
checkpoint or one of ddp's earlier layout, its manifest re-hashed as whoever can write the run directory can, is refused
by export and generate (exit 2, one line naming the file) and skipped by resume, never run."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from tests.test_export import fake_run
from trainer import checkpoint, safe_load
from trainer.save_restore import restore


class Payload:
    """Unpickled, it creates ``marker``: the proof that code from the checkpoint ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rehash(directory):
    for path in directory.glob("manifest_rank*.json"):
        m = json.loads(path.read_text())
        m["files"] = {name: checkpoint._sha256(directory / name) for name in m["files"]}
        path.write_text(json.dumps(m))


def plant(directory, name, marker):
    """Add a payload to the pickled file ``name`` of a checkpoint and re-hash the manifests.
    "dcp item" rewrites the checkpoint with the payload as a non-tensor optimizer value, which
    DCP stores as its own pickle inside a ``.distcp`` file."""
    path = directory / name
    if name == "dcp/.metadata":
        meta = pickle.loads(path.read_bytes())
        meta.planner_data = Payload(marker)
        path.write_bytes(pickle.dumps(meta))
    elif name == "dcp item":
        state = {"step": torch.load(directory / checkpoint.STATE_FILE)["step"]}
        model = checkpoint.load_model_state_dict(directory)
        for p in directory.iterdir():
            (p.unlink() if p.is_file() else [f.unlink() for f in p.iterdir()])
        optim = {"state": {}, "param_groups": [{"lr": Payload(marker), "params": []}]}
        checkpoint.write(directory, 0, state, sharded={"model": model, "optimizer": optim})
    else:
        obj = torch.load(path, weights_only=False)  # the attacker's side: it knows the file is safe
        torch.save({**obj, "payload": Payload(marker)}, path)
    _rehash(directory)


PLANTED = [("legacy", "state.pt"), ("legacy", "rng_rank0.pt"), ("dcp", "state.pt"), ("dcp", "rng_rank0.pt"),
           ("dcp", "dcp/.metadata"), ("dcp", "dcp item")]


@pytest.mark.parametrize("layout, name", PLANTED, ids=[f"{layout}-{name}" for layout, name in PLANTED])
def test_export_and_generate_refuse_a_payload_in_any_pickled_file(tmp_path, capsys, layout, name):
    run, _ = fake_run(tmp_path, layout=layout, steps=(3,))
    ckpt = run / "standard" / "checkpoints" / "checkpoint_00000003"
    marker = tmp_path / "pwned"
    plant(ckpt, name, marker)
    assert not marker.exists()
    planted_file = ckpt / ("dcp/__0_0.distcp" if name == "dcp item" else name)
    for argv in (["export", str(run), "--output-dir", str(tmp_path / "out")],
                 ["export", str(run), "--step", "3", "--output-dir", str(tmp_path / "out")],
                 ["generate", str(run), "--prompt", "def", "--max-new-tokens", "2", "--device", "cpu"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert f"{planted_file}: refused, it holds more than plain data" in err, err
        assert not marker.exists(), f"{argv[0]} ran the planted code"
    assert not (tmp_path / "out").exists()


def _storage(tmp_path, layout):
    """Checkpoints at steps 3 and 6 of a two-rank run (``layout`` dcp, or ddp's earlier layout:
    legacy); the model's weight is the step."""
    storage = tmp_path / "checkpoints"
    for step in (3, 6):
        d = storage / checkpoint.checkpoint_name(step)
        d.mkdir(parents=True)
        model, optimizer = _model()
        with torch.no_grad():
            model.w.fill_(step)
        for rank in range(2):
            state = {"step": step} if rank == 0 else None
            if layout == "legacy" and rank == 0:
                state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
            sharded = checkpoint.sharded_state(model, optimizer) if layout == "dcp" and rank == 0 else None
            checkpoint.write(d, rank, state, 2, sharded=sharded)
    return storage


def _model():
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(4))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


RESUME = [("legacy", "state.pt"), ("legacy", "rng_rank0.pt"), ("legacy", "rng_rank1.pt"), ("dcp", "state.pt"),
          ("dcp", "rng_rank1.pt"), ("dcp", "dcp/.metadata")]


@pytest.mark.parametrize("layout, name", RESUME, ids=[f"{s}-{n}" for s, n in RESUME])
def test_resume_skips_a_checkpoint_with_a_payload_for_the_previous_one(tmp_path, layout, name):
    storage = _storage(tmp_path, layout)
    newest = storage / "checkpoint_00000006"
    marker = tmp_path / "pwned"
    plant(newest, name, marker)
    model, optimizer = _model()
    got = restore(storage, newest, rank=0, world=1, device=torch.device("cpu"), model=model,
                  optimizer=optimizer, strategy="ddp")
    assert got.step == 3 and torch.equal(model.w.detach(), torch.full((4,), 3.0))
    assert len(got.skipped) == 1 and f"{newest / name}: refused, it holds more than plain data" in got.skipped[0]
    assert checkpoint.drop_unusable(storage) == []  # Ray never registered these: nothing to unregister
    assert not marker.exists()


def test_the_loaders_refuse_a_payload_even_when_nothing_verified_the_checkpoint_first(tmp_path):
    """Verification is the first guard; every load is data only on its own as well."""
    storage = _storage(tmp_path, "dcp")
    marker = tmp_path / "pwned"
    plant(storage / "checkpoint_00000006", "rng_rank0.pt", marker)
    with pytest.raises(safe_load.UnsafeFile, match="rng_rank0.pt: refused"):
        safe_load.load(storage / "checkpoint_00000006" / "rng_rank0.pt")
    plant(storage / "checkpoint_00000003", "dcp/.metadata", marker)
    with pytest.raises(safe_load.UnsafeFile, match=r"\.metadata: refused"):
        checkpoint.load_model_state_dict(storage / "checkpoint_00000003")
    model, optimizer = _model()
    with pytest.raises(BaseException, match=r"\.metadata: refused"):  # DCP wraps it in its CheckpointException
        checkpoint.load(storage / "checkpoint_00000003", model, optimizer)
    assert not marker.exists()


def test_a_checkpoint_of_the_earlier_format_still_resumes_with_its_rng(tmp_path):
    """Before issue 32 the RNG file held numpy's state as an ndarray; it still loads, data only."""
    storage = _storage(tmp_path, "legacy")
    newest = storage / "checkpoint_00000006"
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    for rank in range(2):
        torch.save({**checkpoint.rng_state(), "numpy": np.random.get_state()}, newest / f"rng_rank{rank}.pt")
    _rehash(newest)
    np.random.seed(0)
    model, optimizer = _model()
    got = restore(storage, newest, rank=0, world=1, device=torch.device("cpu"), model=model,
                  optimizer=optimizer, strategy="ddp")
    assert got.step == 6 and not got.skipped
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_rng_state_is_plain_data(tmp_path):
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "rng.pt") == []
