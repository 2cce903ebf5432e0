"""Deterministic worker failures (trainer/failures.py) and the failure policy that stops Ray
Train from restarting them (orchestrator/failure_policy.py), without a cluster."""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import pytest
import torch

from trainer import checkpoint, failures
from trainer.config import TrainConfig


def _torch_oom() -> BaseException:
    try:  # a real CPU allocation that cannot succeed: more bytes than any machine has
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    raise AssertionError("allocated 4 EiB")


def _validation_error() -> BaseException:
    try:
        TrainConfig(micro_batch_size=0)
    except ValueError as e:
        return e
    raise AssertionError("accepted micro_batch_size 0")


@pytest.mark.parametrize("make,kind", [
    (_torch_oom, "out_of_memory"),
    (lambda: MemoryError(), "out_of_memory"),
    (lambda: OSError(errno.ENOSPC, "No space left on device", "/runs/r/ckpt"), "no_space"),
    (lambda: RuntimeError("[enforce fail] write failed: No space left on device"), "no_space"),
    (_validation_error, "config"),
    (lambda: ValueError("ATTN_IMPL='fast'; expected one of flash, standard"), "config"),
])
def test_failures_that_a_restart_repeats_are_deterministic(make, kind):
    found = failures.classify(make())
    assert found is not None and found.kind == kind
    assert str(found).endswith("(not retried: a restart would fail the same way)")


def test_a_full_disk_at_a_checkpoint_fails_fast_with_its_own_message():
    found = failures.classify(checkpoint.DiskFull(Path("/runs/r/checkpoint_00000004"), 2**20, 0))
    assert found.kind == "no_space"
    assert str(found).startswith("no space left on device: checkpoint /runs/r/checkpoint_00000004 needs about 1.0 MiB")


@pytest.mark.parametrize("error", [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("collective timed out"),
    OSError(errno.EIO, "Input/output error"),
])
def test_faults_of_a_peer_or_the_machine_stay_retryable(error):
    assert failures.classify(error) is None


def test_fail_fast_reraises_a_deterministic_failure_chained_to_the_original():
    @failures.fail_fast
    def worker(config):
        raise MemoryError("boom")

    with pytest.raises(failures.DeterministicFailure) as e:
        worker({})
    assert e.value.kind == "out_of_memory" and isinstance(e.value.__cause__, MemoryError)
    again = pickle.loads(pickle.dumps(e.value))  # crosses worker -> controller -> driver
    assert (again.kind, str(again)) == (e.value.kind, str(e.value))

    @failures.fail_fast
    def flaky(config):
        raise RuntimeError("Connection closed by peer")

    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        flaky({})


def test_the_policy_raises_at_once_on_a_deterministic_failure_and_retries_the_rest():
    pytest.importorskip("ray.train.v2")
    from ray.exceptions import ActorDiedError
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from orchestrator.failure_policy import FailFastPolicy

    policy = FailFastPolicy(FailureConfig(max_failures=3))
    oom = failures.DeterministicFailure("out_of_memory", "out of memory: RuntimeError: can't allocate memory")
    wrapped = UserExceptionWithTraceback(oom, traceback_str="Traceback ...")
    collateral = UserExceptionWithTraceback(RuntimeError("Connection closed by peer"), traceback_str="...")
    error = pickle.loads(pickle.dumps(WorkerGroupError("rank 0 failed", {0: wrapped, 1: collateral})))
    assert policy.make_decision(error) == FailureDecision.RAISE
    assert failures.find(error).kind == "out_of_memory"

    killed = WorkerGroupError("rank 1 died", {1: ActorDiedError()})
    assert [policy.make_decision(killed) for _ in range(4)] == [FailureDecision.RETRY] * 3 + [FailureDecision.RAISE]
    assert failures.find(killed) is None
