"""Per-step metrics, written by rank 0: JSON lines for scripts, TensorBoard events for people.

tensorboardX is the writer: it comes with ray[train] already and needs no TensorFlow.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer import atomic_write, strict_json

METRICS_FILE = "metrics.jsonl"
ATTEMPTS_FILE = "attempts.jsonl"  # a line per worker-group start (start_step), and per failed group (failed_ranks)


def append_attempt(out_dir: Path, record: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / ATTEMPTS_FILE).open("a") as f:
        f.write(strict_json.dumps(record) + "\n")


def _json_lines(path: Path) -> list[dict]:
    """The JSON objects of a file of one a line (none when it is missing); a line cut short by a
    crash is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_attempts(out_dir: Path) -> list[dict]:
    """The worker-group starts recorded in ``out_dir`` (lines with ``start_step``; the lines
    between them say why a group failed), oldest first."""
    return [rec for rec in _json_lines(out_dir / ATTEMPTS_FILE) if "start_step" in rec]


def read_metrics(path: Path) -> list[dict]:
    """Records from a metrics file, the last one per step winning (a resumed run rewrites steps)."""
    by_step = {rec["step"]: rec for rec in _json_lines(path) if isinstance(rec.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


class MetricsWriter:
    def __init__(self, out_dir: Path, *, start_step: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        # On resume drop what the lost steps wrote, so the file reads as one clean run.
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        # A new file: followers (orchestrator/progress.py) see the rewrite.
        atomic_write.write_text(self.path, "".join(strict_json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        self._file.write(strict_json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{key}", value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
