"""Live progress: follows each variant's metrics.jsonl (written by its rank 0) and logs lines."""

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


class ProgressFollower:
    """A background thread that logs one line per new metrics record, until stopped."""

    def __init__(self, metrics_path: Path, label: str, max_steps: int, interval_s: float = 1.0):
        self.path, self.label, self.max_steps, self.interval_s = metrics_path, label, max_steps, interval_s
        self._stop = threading.Event()
        self._offset = 0
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
        try:
            with self.path.open() as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        if self.path.stat().st_size < self._offset:  # rewritten on resume
            self._offset = 0
            return
        complete, _, _ = chunk.rpartition("\n")
        if not complete:
            return
        self._offset += len(complete) + 1
        for line in complete.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            log.info("[%s] step %d/%d  loss %.4f  %.0f tok/s  %.3f s/step%s", self.label, rec["step"],
                     self.max_steps, rec["loss"], rec["tokens_per_s"], rec["step_time_s"], gpu_figures(rec))
