"""``model.init_from``: the model shapes of a run that starts from a Hugging Face Llama directory,
local or a URI (``s3://``, ...) that the driver and every node fetch into their caches.

Checked on the driver before anything starts: the directory must be a Llama checkpoint whose
tensors all have the shapes its config.json implies, and any model field the user set must
agree with that config. The shapes are then written into the run's config (saved with the run,
so ``--resume``, ``export`` and ``generate`` see them); every worker loads the weights itself.
"""

from __future__ import annotations

import math
from pathlib import Path

from orchestrator import storage
from orchestrator.config import RunConfig, validate
from orchestrator.errors import UsageError
from trainer import location


def _fields(path: str, where: str, source: str, resumed: Path | None) -> tuple[str, dict]:
    from trainer import checkpoint, hf_checkpoint  # torch: imported before Ray starts only by a run that sets init_from
    from trainer.hf_convert import NotLlama

    key = f"{source}: {where}.init_from"
    remote = location.is_uri(path)
    try:
        resolved = path if remote else str(Path(path).expanduser().resolve())  # a URI: each node fetches it
    except RuntimeError:  # how Python 3.11's resolve() reports a symlink loop
        raise UsageError(f"{key}: {path}: symlink loop") from None
    if resumed and _gone(resolved, key) and any(checkpoint.checkpoint_dirs(v / checkpoint.STORAGE_NAME)
                                                for v in resumed.iterdir()):
        return resolved, {}  # the saved config holds its shapes, the checkpoints its weights
    local = storage.fetch_input(resolved, key)
    try:
        return resolved, hf_checkpoint.model_fields(local)
    except NotLlama as e:  # checked on the fetched copy, named by the URI the user gave
        raise UsageError(f"{key}: {str(e).replace(str(local), resolved) if remote else e}") from None


def _gone(where: str, key: str) -> bool:
    if location.is_uri(where):
        storage.check_bucket(where, key)
        return not location.exists(where)
    return not Path(where).exists()


def _agree(a, b) -> bool:
    return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) or isinstance(b, float) else a == b


def _check_set_fields(explicit: dict, fields: dict, where: str, path: str, source: str) -> None:
    """A model field the user set (not null) must equal the checkpoint's."""
    for key, value in fields.items():
        mine = explicit.get(key)
        if mine is not None and not _agree(mine, value):
            raise UsageError(f"{source}: {where}.{key} is {mine!r} but {path}/config.json has {value!r}; "
                             f"leave {where}.{key} unset to take it from model.init_from")


def resolve(cfg: RunConfig, source: str, resumed: Path | None = None) -> RunConfig:
    """``cfg`` with the shapes of every ``init_from`` filled in; UsageError on a bad directory or
    a disagreeing field. Call on the config as loaded (it tells set fields from defaults).
    ``resumed``: the run directory under --resume, whose checkpoints stand in for a removed directory."""
    data = cfg.model_dump()
    base_fields = None
    if cfg.model.init_from:
        path, base_fields = _fields(cfg.model.init_from, "model", source, resumed)
        explicit = {k: getattr(cfg.model, k) for k in cfg.model.model_fields_set}
        _check_set_fields(explicit, base_fields, "model", path, source)
        data["model"].update(base_fields, init_from=path)
    for i, (v, vdata) in enumerate(zip(cfg.variants or [], data.get("variants") or [])):
        where = f"variants[{i}] ({v.name}).model"
        if v.model.get("init_from"):
            path, fields = _fields(v.model["init_from"], where, source, resumed)
            _check_set_fields(v.model, fields, where, path, source)
            vdata["model"] = {**v.model, **fields, "init_from": path}
        elif base_fields is not None:
            _check_set_fields(v.model, base_fields, where, data["model"]["init_from"], source)
    return validate(data, source)
