"""``train --resume RUN_DIR``: continue a stopped run in its own directory
(docs/faults-and-resume.md, "`train --resume RUN_DIR`").

The run keeps its saved ``config.yaml`` (flags such as ``--max-steps`` already applied) and
``options.json``. ``started_with.json`` refuses other data, or a ``config.yaml`` edited to another
model shape (the checkpoints would not load) or sequence length (the data position would mean
other windows).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.config import RunConfig, VariantConfig, resolved_sections
from orchestrator.errors import UsageError
from orchestrator.options import SAVED_OPTIONS
from orchestrator.results import CONFIG_FILE, OPTIONS_FILE, RunSummary, VariantResult, read_summary
from trainer import dataset

STARTED_FILE = "started_with.json"  # what the checkpoints were trained on, written at the first start


@dataclass
class SavedRun:
    run_dir: Path
    options: dict  # the effective TrainOptions fields for this invocation
    summary: Optional[RunSummary]  # the previous summary.json, if the run got that far

    def finished(self) -> dict[str, VariantResult]:
        """Records of the variants that already succeeded: kept as they are, not rerun."""
        variants = self.summary.variants if self.summary else {}
        return {n: r for n, r in variants.items() if r.status == "succeeded"}


def check_flags(opts) -> None:
    """--resume with a flag that the saved run already fixed is a usage error."""
    defaults = {f.name: f.default for f in dataclasses.fields(opts)}
    given = [flag for key, flag in SAVED_OPTIONS.items() if getattr(opts, key) != defaults[key]]
    if given:
        raise UsageError(f"--resume contradicts {', '.join(given)}: a resumed run keeps the options and config "
                         f"it started with (saved in its {OPTIONS_FILE} and {CONFIG_FILE})")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing; is this a run directory made by 'orchestrator train'?") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: unreadable {what} (expected a JSON object)")
    return data


def load(opts) -> SavedRun:
    """The stopped run behind ``opts.resume``; raises UsageError and touches nothing."""
    check_flags(opts)
    run_dir = Path(opts.resume)
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: run directory not found")
    saved = _read_json(run_dir / OPTIONS_FILE, "run options")
    if not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(f"{run_dir / CONFIG_FILE}: missing; is this a run directory made by 'orchestrator train'?")
    summary = read_summary(run_dir)  # None if cut short by a crash: every variant reruns from its checkpoints
    options = {
        "config_file": str(run_dir / CONFIG_FILE),
        "disable_flash_attn": bool(saved.get("disable_flash_attn")),
        "run_both_models": bool(saved.get("run_both_models")),
        "seeds": saved.get("seeds", 1),  # each run of a variant resumes as any variant does
        "output_dir": str(run_dir.parent),
        "name": run_dir.name,
        "address": opts.address,
        "keep_ray": opts.keep_ray,
        "debug": opts.debug,
        "resume": str(run_dir),
    }
    return SavedRun(run_dir=run_dir, options=options, summary=summary)


def started_with(cfg: RunConfig, variants: list[VariantConfig], data_fingerprint: dict) -> dict:
    """The record of what a new run trains, saved in its STARTED_FILE: per variant, the settings
    its checkpoints depend on (``init_from`` only says where the first weights came from)."""
    shapes = {}
    for v in variants:
        model, train = resolved_sections(cfg, v)
        shapes[v.name] = {**{f"model.{k}": x for k, x in model.model_dump(exclude={"init_from"}).items()},
                          "train.seq_len": train.seq_len}
    return {"data": data_fingerprint, "variants": shapes}


def check_unchanged(run: SavedRun, now: dict) -> None:
    """Refuse to resume ``run`` on other data or another model shape or sequence length than it
    started with (``now``: ``started_with`` of this invocation). A run made before the record
    existed is not checked here; its workers refuse a checkpoint that does not fit."""
    path = run.run_dir / STARTED_FILE
    if not path.is_file():
        return
    then = _read_json(path, "record of what the run started with")
    if then.get("data") and then["data"]["sha256"] != now["data"]["sha256"]:
        raise UsageError(f"--resume {run.run_dir}: the data changed since the run started: it trained on "
                         f"{dataset.describe_fingerprint(then['data'])}, and now finds "
                         f"{dataset.describe_fingerprint(now['data'])}; restore that data or start a new run")
    for name, settings in now["variants"].items():
        for key, was in then.get("variants", {}).get(name, {}).items():
            if settings.get(key) != was:
                raise UsageError(f"--resume {run.run_dir}: variant {name}: {key} is {settings.get(key)!r} in "
                                 f"{run.run_dir / CONFIG_FILE}, but its checkpoints were trained with {was!r}; "
                                 "set it back or start a new run")
