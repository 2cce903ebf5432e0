"""Asynchronous checkpoints on local disk, one worker without Ray (what the Saver would report
to Ray is recorded instead): training goes on while the files are written, a resume from such a
checkpoint trains on exactly as from a synchronous one, and a write that fails or is killed
midway never leaves a checkpoint that resume takes for complete. Two workers under FSDP and
DDP, through Ray: tests/test_fsdp_ray.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from trainer import checkpoint
from trainer.config import FaultConfig
from trainer.save_restore import Saver, restore

EVERY = 3


class Recorded(Saver):
    """A Saver whose report to Ray is recorded, with whether the checkpoint verified then; its
    background write waits for ``gate`` (set: it does not wait)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reported: list[tuple[str, bool]] = []
        self.gate = threading.Event()
        self.gate.set()

    def _write(self, *args):
        self.gate.wait()
        super()._write(*args)

    def _report(self, metrics, directory=None, name=None):
        if directory is not None:
            self.reported.append((name, checkpoint.verifies(directory)))


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, optimizer) -> float:
    x = torch.randn(8, 16)  # from the global generator: a resume must restore it too
    loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def _saver(store: Path, model, optimizer, asynchronous: bool, **kwargs) -> Recorded:
    return Recorded(checkpoint.Store(store), rank=0, world=1, strategy="ddp", model=model, optimizer=optimizer,
                    asynchronous=asynchronous, **kwargs)


def _save(saver: Saver, step: int) -> str | None:
    return saver(step, {"step": step, "first_loss": None, "samples_consumed": 0, "world_size": 1}, {"step": step})


def _resumed_losses(store: Path, steps: int) -> list[float]:
    model, optimizer = _model()
    torch.manual_seed(1234)  # whatever the generator holds now, the checkpoint's RNG replaces it
    got = restore(checkpoint.Store(store), None, rank=0, world=1, device=torch.device("cpu"), model=model,
                  optimizer=optimizer, strategy="ddp")
    assert got.step == EVERY
    return [_step(model, optimizer) for _ in range(steps)]


def _train_and_save(store: Path, asynchronous: bool) -> list[float]:
    """Train 2 * EVERY steps, saving at EVERY; the losses after the save. Asynchronously, the
    write is held back until those steps are done, so it must write the copy taken at EVERY."""
    model, optimizer = _model()
    saver = _saver(store, model, optimizer, asynchronous)
    for _ in range(EVERY):
        _step(model, optimizer)
    if asynchronous:
        saver.gate.clear()
    _save(saver, EVERY)
    after = [_step(model, optimizer) for _ in range(EVERY)]
    saver.gate.set()
    saver.wait()
    assert saver.reported == [(checkpoint.checkpoint_name(EVERY), True)]
    return after


def test_a_resume_from_an_asynchronous_checkpoint_trains_on_as_one_from_a_synchronous_checkpoint(tmp_path):
    trained = _train_and_save(tmp_path / "sync", asynchronous=False)
    assert _train_and_save(tmp_path / "async", asynchronous=True) == trained
    from_sync = _resumed_losses(tmp_path / "sync", EVERY)
    assert from_sync == trained  # the run without a stop, exactly
    assert _resumed_losses(tmp_path / "async", EVERY) == from_sync


def test_training_goes_on_while_the_checkpoint_is_written_and_ray_hears_of_it_once_complete(tmp_path):
    model, optimizer = _model()
    saver = _saver(tmp_path, model, optimizer, asynchronous=True)
    saver.gate.clear()
    name = _save(saver, EVERY)
    _step(model, optimizer)  # step EVERY + 1 begins while the write is held back
    assert saver._in_flight.is_alive() and saver.reported == []
    assert saver.block_s[-1]["step"] == EVERY  # what training stood still: recorded before the write
    assert checkpoint.newest_usable(tmp_path) is None  # nothing usable until the write completes
    saver.gate.set()
    saver.wait()
    assert saver.reported == [(name, True)]
    assert checkpoint.newest_usable(tmp_path) == tmp_path / name


def test_the_next_save_waits_for_the_one_in_flight(tmp_path):
    model, optimizer = _model()
    saver = _saver(tmp_path, model, optimizer, asynchronous=True)
    saver.gate.clear()
    _save(saver, EVERY)
    threading.Timer(0.5, saver.gate.set).start()
    _save(saver, 2 * EVERY)  # blocks until the first is written and reported
    assert [name for name, _ in saver.reported] == [checkpoint.checkpoint_name(EVERY)]
    assert saver.block_s[-1]["block_s"] >= 0.4
    saver.wait()
    assert saver.reported == [(checkpoint.checkpoint_name(s), True) for s in (EVERY, 2 * EVERY)]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_full_disk_during_the_write_fails_the_run_and_keeps_the_previous_checkpoint(tmp_path, asynchronous):
    model, optimizer = _model()
    fault = FaultConfig(kind="enospc", rank=0, step=2 * EVERY)
    saver = _saver(tmp_path, model, optimizer, asynchronous, fault=fault, marker_dir=tmp_path)
    _save(saver, EVERY)
    with pytest.raises(checkpoint.DiskFull, match="no space left on device: checkpoint .*checkpoint_00000006 needs about"):
        _save(saver, 2 * EVERY)
        _step(model, optimizer)
        saver.wait()  # the end of training: an asynchronous write's error surfaces here
    assert [name for name, _ in saver.reported] == [checkpoint.checkpoint_name(EVERY)]
    assert checkpoint.checkpoint_dirs(tmp_path) == [tmp_path / checkpoint.checkpoint_name(EVERY)]  # the partial one removed
    assert checkpoint.newest_usable(tmp_path) == tmp_path / checkpoint.checkpoint_name(EVERY)


KILLED_MIDWAY = """
import sys, time
from pathlib import Path
import torch
from tests.test_async_checkpoint import _model, _save, _saver, _step
from trainer import checkpoint

store, written = Path(sys.argv[1]), Path(sys.argv[2])
model, optimizer = _model()
saver = _saver(store, model, optimizer, asynchronous=True)
_save(saver, 3)
saver.wait()
save = torch.save

def save_then_hang(obj, path, *args, **kwargs):
    save(obj, path, *args, **kwargs)
    if isinstance(path, Path) and path.name == checkpoint.STATE_FILE:  # (DCP also saves into buffers)
        written.touch()
        time.sleep(600)

torch.save = save_then_hang
_save(saver, 6)
while True:  # training goes on until the kill
    _step(model, optimizer)
"""


def test_a_worker_killed_during_an_asynchronous_write_leaves_no_checkpoint_that_resume_takes(tmp_path):
    store, written = tmp_path / "checkpoints", tmp_path / "written"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_MIDWAY), str(store), str(written)],
                            cwd=ROOT, env=env)
    try:
        for _ in range(1200):
            if written.exists() or proc.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert written.exists(), "the second checkpoint's write never began"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = store / checkpoint.checkpoint_name(2 * EVERY)
    assert (partial / checkpoint.STATE_FILE).is_file() and not checkpoint.verifies(partial)
    assert checkpoint.newest_usable(store) == store / checkpoint.checkpoint_name(EVERY)
