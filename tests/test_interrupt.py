"""SIGINT/SIGTERM in the driver, without Ray: which exception, which exit code, when."""

import importlib
import os
import signal
import sys

import pytest

from orchestrator import interrupt
from orchestrator.errors import Interrupted
from orchestrator import ray_internals


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_raises_interrupted_with_128_plus_its_number(sig, code):
    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as e:
        with interrupt.handle_signals():
            os.kill(os.getpid(), sig)  # the handler runs before the next line
            pytest.fail("no exception")
    assert e.value.exit_code == code and e.value.signum == sig
    assert signal.getsignal(sig) is before  # restored


def test_a_signal_inside_deferred_is_raised_when_the_block_ends_and_a_second_is_ignored():
    steps = []
    with pytest.raises(Interrupted):
        with interrupt.handle_signals():
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("block finished")
                os.kill(os.getpid(), signal.SIGTERM)  # again: only logged
                steps.append("still running")
    assert steps == ["block finished", "still running"]
    assert interrupt.received() == signal.SIGTERM


def test_a_plain_keyboard_interrupt_from_ray_get_keeps_its_signal():
    """Ray re-raises a bare KeyboardInterrupt out of ray.get; the signal is looked up."""
    with interrupt.handle_signals():
        with pytest.raises(Interrupted):
            with interrupt.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
        stopped = interrupt.as_interrupted(KeyboardInterrupt())
    assert stopped.exit_code == 143 and str(stopped) == "interrupted by SIGTERM"


def test_the_signal_message_promises_no_checkpoint(caplog, tmp_path):
    """During preflight no checkpoint exists: the message says only that the run stops."""
    with caplog.at_level("WARNING", logger="orchestrator.interrupt"), pytest.raises(Interrupted):
        with interrupt.handle_signals():
            os.kill(os.getpid(), signal.SIGINT)
    assert [r.getMessage() for r in caplog.records] == ["received SIGINT: stopping the run"]


def test_sigterm_while_ray_starts_then_sigint_reports_the_sigterm():
    """ray.init installs Ray's SIGTERM handler (sys.exit) before it connects: a SIGTERM then
    bypassed ours, and the SIGINT that followed 0.1 s later was the one reported (exit 130)."""
    from orchestrator.session import _signals_stay_ours

    install_ray_handler = getattr(importlib.import_module(ray_internals.RAY_UTILS_MODULE), ray_internals.SIGTERM_HOOK)
    with pytest.raises(Interrupted) as e:
        with interrupt.handle_signals():
            with interrupt.deferred(), _signals_stay_ours():
                getattr(importlib.import_module(ray_internals.RAY_UTILS_MODULE), ray_internals.SIGTERM_HOOK)(
                    lambda signum, frame: sys.exit(signum))  # what ray.init does
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
    assert e.value.exit_code == 143
    assert getattr(importlib.import_module(ray_internals.RAY_UTILS_MODULE), ray_internals.SIGTERM_HOOK) is \
        install_ray_handler  # Ray's own again after the block
