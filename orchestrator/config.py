"""The run configuration: one YAML file, validated once at load.

Errors name the file, the key path, the value and what was expected; unknown keys are errors
that list the valid names. The built-in default is this schema's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, PositiveInt, ValidationError,
                      field_validator, model_validator)

from orchestrator import labels, yamlload
from orchestrator.errors import UsageError
from trainer import parallel
from trainer.config import AttentionName, ModelConfig, Strict, TrainConfig


# Held out by default: a tenth of the embedded corpus (128k tokens) is ~100 windows at seq_len 128,
# room for train.eval_batches' default 8 batches of 8.
DEFAULT_VAL_FRACTION = 0.1


def _checked_selector(selector: dict[str, str]) -> dict[str, str]:
    labels.check(selector)
    return selector


# A Ray label selector, its syntax checked at load (``labels.check``).
LabelSelector = Annotated[dict[str, str], AfterValidator(_checked_selector)]


def _checked_range(value: Any) -> Any:
    """``[min, max]`` as a tuple, checked here so that an error says what a range must be."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != 2 or not all(type(x) is int for x in value):
        raise ValueError(f"a range is [min, max], two integers (got {list(value)})")
    low, high = value
    if low < 1:
        raise ValueError(f"[min, max] needs min at least 1 (got {list(value)})")
    if low > high:
        raise ValueError(f"[min, max] needs min at most max (got {list(value)})")
    return low, high


# An integer (a fixed size), auto, or [min, max]: an elastic run (docs/elastic.md).
NumWorkers = Annotated[Union[PositiveInt, Literal["auto"], tuple[int, int]], BeforeValidator(_checked_range)]


class ScalingConfig(Strict):
    num_workers: NumWorkers = Field(
        "auto", description="data-parallel workers per variant; auto: one per GPU found (at most 8), "
                            "else 2 CPU workers; [min, max]: elastic, from min up to what the cluster holds")
    use_gpu: Union[Literal["auto"], bool] = Field("auto", description="auto: GPUs when the cluster has enough")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs Ray reserves per worker; also its OMP_NUM_THREADS "
                                                          "unless set")
    max_failures: int = Field(3, ge=-1, description="worker-failure restarts from the last checkpoint; -1 = unbounded")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints Ray Train keeps per variant, newest first")
    label_selector: LabelSelector = Field(default_factory=dict,
                                          description="Ray label selector every variant's workers must match")
    placement_timeout_s: float = Field(60.0, gt=0, description="give up when workers cannot be placed for this long")
    strategy: Literal[("auto", *parallel.NAMES)] = Field(  # type: ignore[valid-type]
        "auto", description="ddp: a full replica per worker; fsdp: sharded; auto: fsdp when ddp's model state "
                            "would not fit comfortably on the smallest planned device")
    memory_headroom: float = Field(0.9, gt=0, le=1, description="fraction of a device's memory a plan may use")
    interconnect_check: Union[Literal["auto"], bool] = Field(
        "auto", description="all-reduce across the planned workers before training; auto: on GPU or multi-node plans")
    interconnect_timeout_s: float = Field(60.0, gt=0, description="an all-reduce check slower than this is a hang")
    hang_timeout_s: float = Field(300.0, gt=0, description="a hung worker group restarts from its last checkpoint "
                                                           "within this: a worker silent for half of it is named "
                                                           "and stopped, a collective waiting all of it fails")
    resize_interval_s: float = Field(60.0, gt=0, description="how often an elastic run checks whether the cluster "
                                                             "holds more workers")


class DataConfig(Strict):
    path: Optional[str] = Field(None, description="a preprocessed token dataset, local or a URI (s3://, gs://, ...) "
                                "each node fetches; null = the embedded corpus")
    val_fraction: Optional[float] = Field(
        None, ge=0, lt=1, description="the tail of the data's windows held out for evaluation, never trained on; "
                                      "null = 0.1 (about 100 windows of the embedded corpus at seq_len 128), or 0 "
                                      "with val_path")
    val_path: Optional[str] = Field(None, description="a second preprocessed dataset (same tokenizer), local or "
                                    "a URI, to evaluate on in place of val_fraction")

    @model_validator(mode="after")
    def _one_held_out_split(self) -> "DataConfig":
        if self.val_path and self.val_fraction:
            raise ValueError("give data.val_fraction or data.val_path, not both")
        return self

    @property
    def held_out_fraction(self) -> float:
        """The fraction of ``path`` held out: ``val_fraction``, or its default."""
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if self.val_path else DEFAULT_VAL_FRACTION


class VariantConfig(Strict):
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="the variant's name: its directory in the run and its key in summary.json")
    attention: AttentionName = Field(description="flash or standard")
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of model fields")
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of train fields")
    label_selector: LabelSelector = Field(default_factory=dict,
                                          description="added to scaling.label_selector for this variant")


class RunConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model's shape")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training settings")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="workers, devices and placement")
    data: DataConfig = Field(default_factory=DataConfig, description="the token dataset")
    attention: AttentionName = Field("flash", description="attention of the single variant")
    variants: Optional[list[VariantConfig]] = Field(None, description="several variants side by side")

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must list at least one variant")
            names = [x.name for x in v]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate variant name(s): {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _variant_overrides_valid(self) -> "RunConfig":
        for i, v in enumerate(self.variants or []):
            for section, base in (("model", self.model), ("train", self.train)):
                merged = {**base.model_dump(), **getattr(v, section)}
                try:
                    type(base).model_validate(merged)
                except ValidationError as e:
                    raise ValueError(f"variants[{i}] ({v.name}).{section}: {_first_error(e, type(base))}") from None
        return self


_UNION_BRANCHES = {"bool", "int", "constrained-int", "float", "str", "list", "dict", "function-after"}


def _field_loc(loc: tuple) -> tuple:
    """The key path of an error, without pydantic's union-branch labels (literal['auto'], bool)."""
    out = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES):
            break
        out.append(part)
    return tuple(out)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(e: ValidationError, model: type) -> str:
    errors = e.errors()
    err = errors[0]
    loc = _field_loc(err["loc"])
    where = _loc(loc)
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(model, loc[:-1])
        hint = f"; valid keys: {', '.join(valid)}" if valid else ""
        return f"unknown key '{where}'{hint}"
    # A union reports one error per branch: say them together ("'auto' or a valid boolean").
    msgs = [x["msg"].removeprefix("Value error, ") for x in errors if _field_loc(x["loc"]) == loc]
    msg = " or ".join(dict.fromkeys([msgs[0]] + [m.removeprefix("Input should be ") for m in msgs[1:]]))
    value = err.get("input")
    if err["type"] != "missing" and not isinstance(value, (dict, list)):
        msg = f"{msg} (got {value!r})"
    return f"{where}: {msg}" if where else msg


def _model_in(annotation) -> type | None:
    """The pydantic model inside an annotation such as Optional[list[VariantConfig]]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found:
            return found
    return None


def _valid_keys(model: type, loc: tuple) -> list[str]:
    """The field names at ``loc`` inside ``model``, for 'unknown key' messages."""
    cls = model
    for part in loc:
        if isinstance(part, str):
            field = cls.model_fields.get(part)
            cls = _model_in(field.annotation) if field else None
            if cls is None:
                return []
    return list(cls.model_fields)


def validate(data: Any, source: str = "config") -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of sections (model, train, ...), got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"{source}: {_first_error(e, RunConfig)}") from None


def load(path: str | Path | None, settings: Optional[Sequence[str]] = None) -> RunConfig:
    """The built-in default when ``path`` is None, else the YAML file; then each ``--set``
    SECTION.KEY=VALUE of ``settings``, in order. The file is validated alone, so its errors name
    it; the settings together, since one may need another (model.dim with model.n_heads), their
    errors naming the settings that touch the key at fault. Settings go into the data as written,
    not into a validated copy: what a user set stays told apart from the defaults (init_from needs it)."""
    data = _read(Path(path)) if path is not None else None
    cfg = validate(data, str(path) if path is not None else "built-in config")
    if not settings:
        return cfg
    data = data or {}  # None: no file, or an empty one
    paths = [_apply(data, setting) for setting in settings]
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        loc = _field_loc(e.errors()[0]["loc"])
        # A setting is at fault when its key lies on the error's path (model for model.dim) or below it.
        blamed = [s for s, p in zip(settings, paths) if p[:len(loc)] == loc[:len(p)]] or settings
        raise UsageError(f"--set {' --set '.join(blamed)}: {_first_error(e, RunConfig)}") from None


def _apply(data: dict, setting: str) -> tuple[str, ...]:
    """Set one SECTION.KEY=VALUE in ``data``; returns the key's path. Sections it names but
    ``data`` lacks are added, so that validation reports an unknown one with the valid names."""
    key, sep, text = setting.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(path):
        raise UsageError(f"--set {setting}: expected SECTION.KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yamlload.load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"--set {setting}: malformed YAML value: {getattr(e, 'problem', None) or e}") from None
    node = data
    for part in path[:-1]:
        # A copy: a YAML alias may share this section with another, which the setting must not
        # change. A value in the way becomes a section, which validation names as the wrong type.
        child = node.get(part)
        node[part] = dict(child) if isinstance(child, dict) else {}
        node = node[part]
    node[path[-1]] = value
    return path


def _read(path: Path) -> Any:
    """The YAML document in the file at ``path``, unvalidated."""
    try:
        text = yamlload.read_text(path)
    except yamlload.NotAConfigFile as e:
        raise UsageError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a YAML file") from None
    except PermissionError:
        raise UsageError(f"{path}: config file not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file (binary content)") from None
    try:
        data = yamlload.load(text)
    except yamlload.DuplicateKeyError as e:
        mark = e.problem_mark
        raise UsageError(f"{path}: duplicate key '{e.key_path}' at line {mark.line + 1}, column {mark.column + 1}; "
                         "give each key once") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return data


def with_overrides(cfg: RunConfig, source: str, **sections: dict) -> RunConfig:
    """A copy with ``section={key: value}`` overrides applied and validated (for CLI flags)."""
    data = cfg.model_dump()
    for section, values in sections.items():
        if isinstance(data.get(section), dict):
            data[section].update({k: v for k, v in values.items() if v is not None})
        elif values is not None:
            data[section] = values
    return validate(data, source)


def variant_configs(cfg: RunConfig, run_both: bool, disable_flash: bool = False,
                    source: str = "config") -> list[VariantConfig]:
    """The variants to run: the config's list, one variant, or with --run-both-models two.

    --run-both-models runs the config's own two variants (two *model* variants, as in the
    workflow our users come from: a model and its baseline), or flash and standard when the
    config lists none. Disabling flash attention names the lone default variant `standard`;
    it leaves a list of variants as it is: the planner gives every variant standard
    attention and keeps each one's request for the record.
    """
    if run_both:
        if cfg.variants is None:
            return [VariantConfig(name="flash", attention="flash"), VariantConfig(name="standard", attention="standard")]
        if len(cfg.variants) != 2:
            raise UsageError(f"{source}: --run-both-models runs the config's two variants, but 'variants' lists "
                             f"{len(cfg.variants)} ({', '.join(v.name for v in cfg.variants)}); list exactly two, "
                             "or drop --run-both-models to run them all")
    if cfg.variants:
        return list(cfg.variants)
    attn = "standard" if disable_flash else cfg.attention
    return [VariantConfig(name=attn, attention=attn)]


def resolved_sections(cfg: RunConfig, variant: VariantConfig) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig.model_validate({**cfg.model.model_dump(), **variant.model})
    train = TrainConfig.model_validate({**cfg.train.model_dump(), **variant.train})
    return model, train
