"""Why a worker group ended: which ranks failed, and how, in the variant's attempts.jsonl.

Rank 0 writes a line when a group starts (trainer/loop.py); a group that fails writes none,
and its ranks may be dead or frozen. Ray Train's controller knows, though: it hands every
poll that found errors to ``UserCallback.after_exception``, keyed by rank. This callback
appends them as one line, so a hang reads by name ("rank 1: a worker health check has been
hanging for 15 s") between the attempt it ended and the one that followed.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.train import UserCallback

from trainer.metrics import append_attempt


def one_line(err: BaseException) -> str:
    """The root cause of a (possibly wrapped) Ray error, on one line."""
    while getattr(err, "__cause__", None) is not None:
        err = err.__cause__
    text = str(err).strip()
    lines = [l for l in text.splitlines() if l.strip()]
    if not lines:
        return type(err).__name__
    # Ray wraps worker tracebacks; the last line names the original exception. A health check
    # says what happened first, then why (a dead actor's node) or how to change its timeout.
    line = lines[-1].strip()
    if "health check" in lines[0]:
        line = " ".join([lines[0].strip(), *(l.strip() for l in lines if l.strip().startswith("The actor died"))])
    return line if len(line) < 400 else line[:400] + "..."


class FailureLog(UserCallback):
    """Runs in Ray Train's controller actor; the variant directory is on storage it shares."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        append_attempt(Path(self.out_dir), {"time": time.time(), "failed_ranks": {
            str(rank): one_line(e) for rank, e in sorted(worker_exceptions.items())}})
