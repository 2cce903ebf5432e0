"""Live progress: follows each variant's attempts.jsonl and metrics.jsonl (written by its rank 0)
and logs one line per new step, and one per worker-group start that resumes from a checkpoint.

Only what this invocation trains is shown: a resumed run says the step and checkpoint it starts
from instead of replaying the steps an earlier invocation logged.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def gpu_figures(rec: dict) -> str:
    """'  MFU 55.7%  9,925 tok/s/GPU' where the worker measured them (GPU runs), else ''."""
    out = ""
    if rec.get("mfu") is not None:
        out += f"  MFU {rec['mfu']:.1%}"
    if rec.get("tokens_per_s_per_gpu") is not None:
        out += f"  {rec['tokens_per_s_per_gpu']:,.0f} tok/s/GPU"
    return out


def held_out(rec: dict) -> str:
    """'  val_loss 5.1234 (ppl 169.0)' on an evaluation step, else ''."""
    if rec.get("val_loss") is None:
        return ""
    return f"  val_loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:,.1f})"


def stragglers(rec: dict) -> str:
    """'  straggler rank 1 on node-b (1.83x the median rank)' where the step named one, else ''."""
    from orchestrator.results import named_stragglers

    return f"  {named_stragglers(rec['stragglers'])}" if rec.get("stragglers") else ""


class _Tail:
    """New complete JSON lines of a file that is appended to, or rewritten from the start."""

    def __init__(self, path: Path, from_end: bool):
        self.path = path
        st = path.stat() if path.is_file() else None
        self.offset = st.st_size if from_end and st else 0
        self.inode = st.st_ino if st else None

    def records(self) -> list[dict]:
        try:
            st = self.path.stat()
            # Rewritten: a resumed attempt replaces the file without the steps it redoes (a new
            # file, so a rewrite that has already grown past the old size is still seen).
            if st.st_ino != self.inode or st.st_size < self.offset:
                self.offset, self.inode = 0, st.st_ino
            with self.path.open() as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete, _, _ = chunk.rpartition("\n")
        if not complete:
            return []
        self.offset += len(complete) + 1
        out = []
        for line in complete.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def _last_step(path: Path) -> int:
    from trainer.metrics import read_metrics

    recs = read_metrics(path)
    return recs[-1]["step"] if recs else 0


class ProgressFollower:
    """A background thread that logs new steps and resumptions, until stopped."""

    def __init__(self, metrics_path: Path, label: str, max_steps: int, interval_s: float = 1.0):
        from trainer.metrics import ATTEMPTS_FILE

        self.label, self.max_steps, self.interval_s = label, max_steps, interval_s
        self._metrics = _Tail(metrics_path, from_end=True)
        self._attempts = _Tail(metrics_path.with_name(ATTEMPTS_FILE), from_end=True)
        self._shown = _last_step(metrics_path)  # steps up to here were logged by an earlier invocation
        self._starts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{label}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # whatever arrived after the last tick

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        for att in self._attempts.records():  # rank 0 appends it before it rewrites metrics
            if "start_step" not in att:  # a failed group (orchestrator/failure_log.py)
                for rank, error in (att.get("failed_ranks") or {}).items():
                    log.warning("[%s] rank %s failed: %s", self.label, rank, error)
                continue
            self._starts += 1
            step = int(att.get("start_step") or 0)
            source = Path(att["restored_from"]).name if att.get("restored_from") else None
            if source:
                log.info("[%s] resuming at step %d from %s with %s worker(s)", self.label, step, source,
                         att.get("world_size", "?"))
            elif self._starts > 1 or self._shown:
                log.info("[%s] no usable checkpoint: starting again from step 0", self.label)
            self._shown = step
        for rec in self._metrics.records():
            if not isinstance(rec.get("step"), int) or rec["step"] <= self._shown:
                continue
            self._shown = rec["step"]
            log.info("[%s] step %d/%d  loss %.4f  %.0f tok/s  %.3f s/step%s%s%s", self.label, rec["step"],
                     self.max_steps, rec["loss"], rec["tokens_per_s"], rec["step_time_s"], gpu_figures(rec),
                     held_out(rec), stragglers(rec))
