"""The options of ``orchestrator train``, in one table: each field of ``TrainOptions`` carries
its command-line flag, help text and whether a resumed run takes it from its saved files.
The CLI's flags (``add_train_args``) and ``--resume``'s check (``SAVED_OPTIONS``) are made
from it, so a new option is added once.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from orchestrator.errors import UsageError

EXPECT_GPUS_HELP = "GPUs each node must have for preflight to find it healthy (default: as many as Ray advertises there)"
FRESH_PREFLIGHT_HELP = ("probe every node again instead of reusing its cached result (which is reused only "
                        "while nothing it depends on has changed)")
SET_HELP = ("set one config key, YAML value (e.g. train.lr=3e-4, model.dim=128, scaling.num_workers=1); "
            "repeatable, applied after --config-file and checked as the file is")


def _opt(default, flag: Optional[str], help: str, *, metavar: Optional[str] = None, saved: bool = False):
    """A field with its flag (None: no flag of its own), help, and saved: a resumed run keeps it."""
    return field(default=default, metadata={"flag": flag, "help": help, "metavar": metavar, "saved": saved})


@dataclass(kw_only=True)
class TrainOptions:
    """Everything ``orchestrator train`` takes; a script can build one and call ``run.train``."""

    config_file: Optional[str] = _opt(None, "--config-file", "YAML config (default: the built-in small config)",
                                      metavar="PATH", saved=True)
    settings: Optional[list[str]] = _opt(None, "--set", SET_HELP, metavar="SECTION.KEY=VALUE", saved=True)
    preprocessed_data: Optional[str] = _opt(None, "--preprocessed-data", "token dataset from 'preprocess' "
                                            "(default: embedded corpus)", metavar="DIR", saved=True)
    disable_flash_attn: bool = _opt(False, "--disable-flash-attn", "standard attention everywhere; no process "
                                    "imports flash-attn", saved=True)
    run_both_models: bool = _opt(False, "--run-both-models", "train the flash and the standard variant side by side",
                                 saved=True)
    address: Optional[str] = _opt(None, "--address", "Ray cluster to join (default: start a local Ray, shut it "
                                  "down after)")
    output_dir: str = _opt("runs", "--output-dir", "where run directories go (default: ./runs)", saved=True)
    max_steps: Optional[int] = _opt(None, "--max-steps", "override train.max_steps", saved=True)
    seed: Optional[int] = _opt(None, "--seed", "override train.seed", saved=True)
    seeds: int = _opt(1, "--seeds", "train each variant K times, with seeds train.seed, train.seed + 1, ... (as "
                      "variants <variant>-s1 .. -sK); the report gives each variant's mean ± spread over them",
                      metavar="K", saved=True)
    name: Optional[str] = _opt(None, "--name", "run name (default: run-<date>-<time>, made unique)", saved=True)
    debug: bool = _opt(False, None, "tracebacks on errors and worker logs on the console (the global --debug)")
    resume: Optional[str] = _opt(None, "--resume", "continue a stopped run in its directory, with its saved config "
                                 "and options", metavar="RUN_DIR")
    # Not saved: probing afresh is this invocation's wish, not a property of the run.
    fresh_preflight: bool = _opt(False, "--fresh-preflight", FRESH_PREFLIGHT_HELP)
    # Not saved either: they judge the cluster as it is now, which a resumed run probes again.
    expect_gpus: Optional[int] = _opt(None, "--expect-gpus", EXPECT_GPUS_HELP, metavar="N")
    allow_unhealthy: bool = _opt(False, "--allow-unhealthy", "train on nodes preflight finds unhealthy instead of "
                                 "leaving them out of the plan")
    keep_ray: bool = _opt(False, "--keep-ray", "start a local Ray that outlives the command, or join the one an "
                          "earlier --keep-ray left running (stop it with: python -m orchestrator ray-down)")


FIELDS = dataclasses.fields(TrainOptions)

# Options a resumed run takes from its saved files; giving them again contradicts --resume.
SAVED_OPTIONS = {f.name: f.metadata["flag"] for f in FIELDS if f.metadata["saved"]}
_TYPES = {"Optional[int]": int, "int": int}  # annotations are strings here (from __future__ import annotations)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``train``, one per option that has one."""
    for f in FIELDS:
        flag = f.metadata["flag"]
        if flag is None:
            continue
        kw = {"help": f.metadata["help"], "default": f.default}
        if f.type == "bool":
            kw["action"] = "store_true"
        else:
            kw.update(metavar=f.metadata["metavar"], type=_TYPES.get(f.type, str))
            if f.type.startswith("Optional[list["):  # the flag may be given again, each adding one
                kw["action"] = "append"
            if kw["metavar"] is None:
                del kw["metavar"]
        p.add_argument(flag, dest=f.name, **kw)


def from_args(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(**{f.name: getattr(args, f.name) for f in FIELDS})


def check_expect_gpus(expect_gpus: Optional[int]) -> None:
    """``--expect-gpus``, of train and preflight alike: a count of GPUs, 0 or more."""
    if expect_gpus is not None and expect_gpus < 0:
        raise UsageError(f"--expect-gpus {expect_gpus}: must be 0 or more")
