"""Typed params: load params.yaml, validate every key before any work starts.

    from lowbit.config import load_params
    params = load_params("params.yaml", overrides=["baseline.epochs=2"])

Unknown keys, wrong types and out-of-range values raise LowbitError naming the
file, the dotted key and what is allowed. Every key must be present in
params.yaml: DVC tracks params by key, so a default hidden in code would let a
change slip past `dvc status`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML

from lowbit.declared import observer_names, scheme_names
from lowbit.errors import LowbitError
from lowbit.io import atomic_write_text


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelParams(Section):
    task: Literal["sequence_classification", "causal_lm"]  # the keys of lowbit.task_types.TASK_TYPES (a test checks)
    name: str = Field(min_length=1)
    trust_remote_code: bool
    max_length: int = Field(ge=8, le=8192)


Column = str | int  # a name, or a 0-based position (the only way to name a column of a headerless file)


class DataParams(Section):
    source: str = Field(min_length=1)
    header: bool
    text_column: Column
    label_column: Column
    test_source: str | None
    max_rows: int | None = Field(ge=10)
    builtin_rows: int = Field(ge=60)
    reverse: bool
    seed: int

    @model_validator(mode="after")
    def headerless_columns_are_positions(self) -> "DataParams":
        for key in ("text_column", "label_column"):
            column = getattr(self, key)
            if isinstance(column, str) and not column:
                raise ValueError(f"{key} is empty; give a column name or a 0-based position")
            if isinstance(column, int) and column < 0:
                raise ValueError(f"{key}: {column} is not a column position (0 = the first column)")
            if not self.header and isinstance(column, str):
                raise ValueError(f"{key}: {column!r} is a column name, but header is false: the file has no names; "
                                 "give the column's 0-based position (e.g. text_column: 1)")
        return self


class PrepareParams(Section):
    val_fraction: float = Field(gt=0.0, lt=0.5)
    test_fraction: float = Field(gt=0.0, lt=0.5)
    calib_size: int = Field(ge=1)


class TrainParams(Section):
    epochs: int = Field(ge=1, le=1000)
    learning_rate: float = Field(gt=0.0, le=1.0)
    batch_size: int = Field(ge=1, le=4096)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0, le=1.0)
    max_grad_norm: float = Field(gt=0.0)
    group_by_length: bool
    seed: int


def registered(kind: str, names: list[str], known: list[str]) -> list[str]:
    """Names checked against a registry, so the message lists what this install really has."""
    for name in names:
        if name not in known:
            raise ValueError(f"{name!r} is not one of the {kind}: {', '.join(known)}")
    return names


class PTQParams(Section):
    schemes: list[str]
    observers: list[str] = Field(min_length=1)
    percentile: float = Field(gt=50.0, lt=100.0)
    int4_group_size: int = Field(ge=2, le=4096)
    calib_rows: int = Field(ge=1)
    calib_batch_size: int = Field(ge=1)
    quantize_embeddings: bool
    skip_modules: list[str]
    sensitivity: bool

    @field_validator("schemes")
    @classmethod
    def known_schemes(cls, names: list[str]) -> list[str]:
        return registered("schemes", names, scheme_names())

    @field_validator("observers")
    @classmethod
    def known_observers(cls, names: list[str]) -> list[str]:
        return registered("observers", names, observer_names())


class QATParams(TrainParams):
    init_observer: str
    observer_freeze_fraction: float = Field(ge=0.0, le=1.0)

    @field_validator("init_observer")
    @classmethod
    def known_observer(cls, name: str) -> str:
        return registered("observers (or ema)", [name], ["ema", *observer_names()])[0]

    @model_validator(mode="after")
    def ema_ranges_need_steps_to_form(self) -> "QATParams":
        if self.init_observer == "ema" and self.observer_freeze_fraction == 0.0:
            raise ValueError(
                "init_observer 'ema' takes its ranges from training batches, so observer_freeze_fraction must be > 0 "
                "(or start from a calibration observer: minmax, percentile, mse, entropy)"
            )
        return self


class LoraParams(TrainParams):
    r: int = Field(ge=1, le=1024)
    alpha: float = Field(gt=0.0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"]
    bias: Literal["none", "all", "lora_only"]


class QLoraParams(LoraParams):
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"]
    gradient_checkpointing: bool
    requantize_merged: Literal["none", "nf4", "int8"]


class ExportParams(Section):
    max_merge_drop: float = Field(ge=0.0, le=100.0)


class EvaluateParams(Section):
    batch_size: int = Field(ge=1, le=4096)
    latency_samples: int = Field(ge=5)
    latency_rounds: int = Field(ge=1)
    warmup_batches: int = Field(ge=0)
    num_threads: int = Field(ge=0)
    calibration: Literal["none", "temperature", "platt", "isotonic"]
    bootstrap_resamples: int = Field(ge=1, le=1_000_000)
    bootstrap_seed: int
    significance_level: float = Field(gt=0.0, lt=1.0)
    generation_samples: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1, le=4096)


class ReportParams(Section):
    max_accuracy_drop: float = Field(ge=0.0, le=100.0)


# Metrics a promotion objective can rank by, and which way is better.
PROMOTION_OBJECTIVES = {"accuracy": True, "f1_macro": True, "weight_bytes": False, "latency_ms_p50": False,
                        "throughput_samples_s": True}


# MLflow refuses `latest` and `v<n>` as aliases (they already name versions).
RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
VALID_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")


def alias_name(alias: str) -> str:
    if RESERVED_ALIAS.match(alias):
        raise ValueError(f"alias {alias!r} is reserved by MLflow (`latest` and `v<n>` name versions); choose another")
    if not VALID_ALIAS.match(alias):
        raise ValueError(f"alias {alias!r}: use letters, digits, '_' and '-' only")
    return alias


class PromoteParams(Section):
    registered_model: str = Field(min_length=1, max_length=256)
    champion_alias: str
    previous_alias: str
    objective: str
    max_accuracy_drop: float = Field(ge=0.0, le=100.0)
    max_weight_bytes: int | None = Field(ge=1)
    max_latency_ms_p50: float | None = Field(gt=0.0)
    min_improvement: float = Field(gt=0.0, le=1.0)  # relative; MLflow's MetricThreshold takes (0, 1]
    accuracy_tolerance: float = Field(ge=0.0, le=100.0)

    @field_validator("objective")
    @classmethod
    def known_objective(cls, name: str) -> str:
        return registered("promotion objectives (metrics)", [name], list(PROMOTION_OBJECTIVES))[0]

    @field_validator("champion_alias", "previous_alias")
    @classmethod
    def usable_alias(cls, alias: str) -> str:
        return alias_name(alias)

    @model_validator(mode="after")
    def distinct_aliases(self) -> "PromoteParams":
        if self.champion_alias == self.previous_alias:
            raise ValueError(f"champion_alias and previous_alias are both {self.champion_alias!r}; they must differ")
        return self


class DeterminismParams(Section):
    enabled: bool
    num_threads: int = Field(ge=0, le=1024)


class RunnerParams(Section):
    kind: Literal["threads", "dask"]
    parallel: int = Field(ge=0, le=1024)
    dask_address: str

    @model_validator(mode="after")
    def address_needs_dask(self) -> "RunnerParams":
        if self.dask_address and self.kind != "dask":
            raise ValueError(f"dask_address is set ({self.dask_address!r}) but kind is {self.kind!r}; set kind: dask")
        return self


class TrackingParams(Section):
    uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    artifact_location: str = Field(min_length=1)
    dvc_push: bool
    dvc_remote: str

    @field_validator("dvc_remote")
    @classmethod
    def remote_url(cls, url: str) -> str:
        """A URL DVC can push to (s3://bucket/prefix, gs://..., ssh://..., /abs/path), or "" for the
        project's default remote. A relative path would be resolved against whatever the cwd is."""
        if url and "://" not in url and not url.startswith("/"):
            raise ValueError(f"{url!r} is not a remote URL; give e.g. s3://bucket/lowbit-dvc or an absolute path, "
                             "or \"\" for the project's DVC default remote")
        return url


class Params(Section):
    model: ModelParams
    data: DataParams
    prepare: PrepareParams
    baseline: TrainParams
    ptq: PTQParams
    qat: QATParams
    lora: LoraParams
    qlora: QLoraParams
    export: ExportParams
    evaluate: EvaluateParams
    report: ReportParams
    promote: PromoteParams
    determinism: DeterminismParams
    runner: RunnerParams
    tracking: TrackingParams

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump()

    def digest(self) -> str:
        """sha256 of the validated params, canonical JSON: equal params, equal hash."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    path = Path(path)
    raw = read_yaml_mapping(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value, path)
    return validate_params(raw, path)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LowbitError(f"{path}: file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise LowbitError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise LowbitError(f"{path}: expected a mapping of sections (model, data, ...), got {type(raw).__name__}")
    return raw


def validate_params(raw: dict[str, Any], path: Path | str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = [describe_error(e, raw) for e in err.errors()]
        raise LowbitError(f"{path}: invalid params:\n  " + "\n  ".join(lines)) from None


def describe_error(error: dict[str, Any], raw: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent_loc = error["loc"][:-1]
        allowed = sorted(_model_at(parent_loc).model_fields)
        return f"{key}: unknown key; allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: missing; add it to params.yaml"
    if kind == "value_error":  # a check across keys of one section: the message names them
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def _model_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc:
        model = model.model_fields[part].annotation  # type: ignore[assignment]
    return model


def parse_override(item: str) -> tuple[str, Any]:
    """`baseline.epochs=2` -> ("baseline.epochs", 2); the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LowbitError(f"override {item!r}: expected KEY=VALUE, e.g. baseline.epochs=2")
    parsed = yaml.safe_load(value) if value.strip() else None
    if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 as a string; users mean the number
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


PRESETS_DIR = "presets"


def preset_overrides(root: str | Path, name: str) -> list[str]:
    """presets/<name>.yaml (params.yaml's shape, only the keys it changes) as KEY=VALUE overrides."""
    folder = Path(root) / PRESETS_DIR
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise LowbitError(f"preset {name!r}: there is no {path}; presets in {folder}: {known}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise LowbitError(f"{path}: expected sections of params.yaml (e.g. `baseline: {{epochs: 3}}`), got {type(raw).__name__}")
    return [f"{key}={json.dumps(value)}" for key, value in flatten("", raw).items()]


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """Nested sections as dotted keys: flatten("", {"baseline": {"epochs": 2}}) == {"baseline.epochs": 2}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out |= flatten(f"{prefix}.{key}" if prefix else str(key), inner)
        return out
    return {prefix: value}


def set_dotted(raw: dict[str, Any], key: str, value: Any, path: Path | str) -> None:
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            where = ".".join(parts[: depth + 1])
            raise LowbitError(f"{path}: override {key}: '{where}' is not a section; sections: {', '.join(raw)}")
        node = node[part]
    if parts[-1] not in node:
        where = ".".join(parts[:-1])
        raise LowbitError(f"{path}: override {key}: unknown key; keys in {where}: {', '.join(node)}")
    node[parts[-1]] = value


def write_overrides(path: str | Path, overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """Apply validated overrides to params.yaml in place, keeping its comments.

    Like `dvc exp run --set-param`: params.yaml stays the single source of truth,
    so `dvc status` and `dvc repro` see the same values the run used.
    Returns (key, old, new) for each change. Validates first: on error the file is untouched.
    """
    path = Path(path)
    load_params(path, overrides)  # raises before anything is written
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096  # keep each key on its line: ruamel wraps long flow lists at 80 columns
    # write `null` as null: ruamel leaves the value empty, which reads the same but hides the default
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    changes = []
    for item in overrides:
        key, value = parse_override(item)
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        changes.append((key, node[leaf], value))
        node[leaf] = value
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
    return changes
