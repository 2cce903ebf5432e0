"""Which worker failures are deterministic: the same attempt would fail the same way again.

Ray Train restarts a failed worker group up to ``scaling.max_failures`` times from the last
checkpoint. That is right for a killed worker or a lost node, and wasted minutes for an
allocation that does not fit (the restart allocates the same shapes), a full disk, or a bad
config or code path. Those are classified here, in the worker, where the original exception
is at hand; ``fail_fast`` re-raises them as ``DeterministicFailure``, and the driver's failure
policy (orchestrator/failure_policy.py) fails the variant on the first one. This is the one
way a worker stops a run for good: code that knows its failure is deterministic raises
``DeterministicFailure(kind, cause)`` itself.
"""

from __future__ import annotations

import errno
import functools
from typing import Callable, Optional

from pydantic import ValidationError

# Exceptions that a restart with the same config and code raises again.
CODE_OR_CONFIG = (ValidationError, ValueError, TypeError, KeyError, AttributeError, NotImplementedError, ImportError)
_OOM_TEXT = ("can't allocate memory", "out of memory", "not enough memory")


class DeterministicFailure(RuntimeError):
    """A worker failure that no restart fixes; ``kind`` is out_of_memory, no_space, config or
    non_finite_loss (trainer/finite.py)."""

    def __init__(self, kind: str, cause: str):
        self.kind, self.cause = kind, cause
        super().__init__(f"{cause} (not retried: a restart would fail the same way)")

    def __reduce__(self):  # crosses processes (worker -> controller -> driver) intact
        return (self.__class__, (self.kind, self.cause))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def classify(e: BaseException) -> Optional[DeterministicFailure]:
    """The deterministic failure ``e`` stands for, or None for one worth a restart."""
    if isinstance(e, DeterministicFailure):
        return e
    text = str(e).lower()
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(t in text for t in _OOM_TEXT)):
        # torch.OutOfMemoryError is a RuntimeError whose message says "out of memory".
        return DeterministicFailure("out_of_memory", f"out of memory: {_first_line(e)}; lower "
                                    "train.micro_batch_size or train.seq_len, or use more workers")
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "no space left on device" in text:
        # checkpoint.DiskFull's own message says so already, and what to free
        said = isinstance(e, OSError) and str(e.strerror).startswith("no space left on device")
        return DeterministicFailure("no_space", e.strerror if said else f"no space left on device: {_first_line(e)}")
    if isinstance(e, CODE_OR_CONFIG):
        return DeterministicFailure("config", f"error in the worker's config or code: {_first_line(e)}")
    return None


def fail_fast(fn: Callable) -> Callable:
    """Wrap a worker's training function: a deterministic failure is raised as DeterministicFailure."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            found = classify(e)
            if found is None or found is e:
                raise
            raise found from e

    return wrapper


def find(error: BaseException) -> Optional[DeterministicFailure]:
    """The DeterministicFailure inside a Ray Train error (WorkerGroupError wraps each rank's
    exception in a UserExceptionWithTraceback), or None."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DeterministicFailure):
            return e
        stack.extend(getattr(e, "worker_failures", {}).values())
        stack += [getattr(e, "_base_exc", None), getattr(e, "controller_failure", None), e.__cause__]
    return None
