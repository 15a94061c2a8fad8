"""The MLflow pyfunc for every lowbit variant, logged as code ("models from code").

flows/model_artifacts.py logs this file with `mlflow.pyfunc.log_model(python_model=<this path>, ...)`:
MLflow copies the file into the logged model and, at load time, executes it and takes the
object given to `mlflow.models.set_model` below. Nothing is pickled, so loading the model
runs this file and lowbit's loaders, never a deserialiser of arbitrary objects.

    model = mlflow.pyfunc.load_model("models:/lowbit-classifier@champion")
    model.predict(pd.DataFrame({"text": ["great film", "dull"]}))
    #   label  label_id  prob_negative  prob_neutral  prob_positive

Artifacts (names are the keys of `context.artifacts`):
- `model`      the variant's saved directory, loaded by lowbit.formats.load_variant (its card
               `lowbit_variant.json` names the storage format: hf, int8, int4, bnb, pt2e, peft);
- `settings`   serving.json: labels, max_length, the model params, the variant's name and format;
- `calibrator` (optional) the evaluate stage's metrics/calibrators/<variant>.json;
- `base_model` (optional, adapters only) the base model directory the adapter is applied to.

This file imports only lowbit, MLflow, pandas and the standard library: MLflow runs it under
a generated module name, so it cannot rely on the `flows` package being importable.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from lowbit.calibration import Calibrator
from lowbit.config import ModelParams
from lowbit.errors import LowbitError
from lowbit.evaluation import predict_probabilities
from lowbit.formats import load_variant
from lowbit.io import read_json, write_json
from lowbit.variants import CARD

MODEL = "model"
SETTINGS = "settings"
CALIBRATOR = "calibrator"
BASE_MODEL = "base_model"
SETTINGS_FILE = "serving.json"
SETTINGS_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file; names the base the adapter was trained on
TEXT = "text"


def probability_column(label: str) -> str:
    return f"prob_{label}"


def output_columns(labels: list[str]) -> list[str]:
    return ["label", "label_id", *(probability_column(name) for name in labels)]


def texts_of(model_input) -> list[str]:
    """The raw texts of a DataFrame's `text` column, a Series, a list of str, a {"text": [...]} dict or one str."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT not in model_input.columns:
            raise LowbitError(f"the input needs a {TEXT!r} column; it has: {', '.join(map(str, model_input.columns))}")
        values = model_input[TEXT].tolist()
    elif isinstance(model_input, dict):
        if TEXT not in model_input:
            raise LowbitError(f"the input needs a {TEXT!r} key; it has: {', '.join(map(str, model_input))}")
        values = model_input[TEXT]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        values = list(model_input)
    else:
        raise LowbitError(f"the input must be a DataFrame with a {TEXT!r} column or a list of str, "
                          f"not {type(model_input).__name__}")
    bad = [i for i, value in enumerate(values) if not isinstance(value, str)]
    if bad:
        # str(None) would be classified as the text "None": refuse instead of guessing
        raise LowbitError(f"every {TEXT!r} must be a string; row {bad[0]} is {type(values[bad[0]]).__name__} (through "
                          f"mlflow.pyfunc a dict is one row: pass a DataFrame or a list of {{{TEXT!r}: ...}} records)")
    return values


def staged_adapter(adapter_dir: Path, base: str, into: Path) -> Path:
    """A copy of a saved adapter whose card and adapter_config.json both name `base`.

    lowbit's adapter loader refuses an adapter whose recorded base (the absolute path it was
    trained from) differs from its card's; in a logged model the base lives somewhere else
    (the downloaded `base_model` artifact, or the embedded package on this machine). Whether
    the adapter belongs to that base was checked when it was logged (model_artifacts), so the
    copy names the base where it is now. Adapters are small; the base is not copied."""
    staged = into / adapter_dir.name
    shutil.copytree(adapter_dir, staged)
    card = read_json(staged / CARD)
    write_json(staged / CARD, card | {"base_model": base})
    config_path = staged / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"base_model_name_or_path": base}, indent=2))
    return staged


def load_served_variant(artifacts: dict[str, str], settings: dict):
    """(model, tokenizer) of the logged variant, through lowbit's own loaders."""
    model_dir = Path(artifacts[MODEL])
    # a model registered before task types existed is a classifier: its settings carry no `task`
    params = ModelParams(**{"task": "sequence_classification", **settings["model_params"]})
    if settings["format"] != "peft":
        return load_variant(model_dir, params)
    base = artifacts.get(BASE_MODEL) or settings["base_model"]
    with tempfile.TemporaryDirectory(prefix="lowbit-adapter-") as scratch:
        # everything is read into memory before the scratch copy goes
        return load_variant(staged_adapter(model_dir, base, Path(scratch)), params)


class LowbitClassifier(mlflow.pyfunc.PythonModel):
    """Labels and class probabilities for raw texts, from one saved lowbit variant."""

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        self.settings = read_json(Path(artifacts[SETTINGS]))
        if self.settings.get("version") != SETTINGS_VERSION:
            raise LowbitError(f"{SETTINGS_FILE}: version {self.settings.get('version')!r}; this lowbit reads "
                              f"version {SETTINGS_VERSION}: log the model again with this lowbit")
        self.labels = list(self.settings["labels"])
        self.max_length = int(self.settings["max_length"])
        self.model, self.tokenizer = load_served_variant(artifacts, self.settings)
        path = artifacts.get(CALIBRATOR)
        self.calibrator = Calibrator.from_json(read_json(Path(path))) if path else None

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """A DataFrame with `label` (name), `label_id` and one `prob_<label>` column per class, a row per text.

        Through mlflow.pyfunc the input is checked against the signature first: a DataFrame with a
        `text` column, or a list of {"text": ...} records. Called directly (unwrap_python_model()),
        a list of str works too. The probabilities are the calibrated ones when the variant's calibrator was logged, and
        `label` is their argmax. Temperature scaling (lowbit's default) never moves the argmax,
        so the labels are those the evaluate stage scored; platt and isotonic calibrators can."""
        texts = texts_of(model_input)
        if not texts:
            frame = pd.DataFrame({name: pd.Series(dtype=float) for name in output_columns(self.labels)})
            return frame.astype({"label": object, "label_id": "int64"})
        probabilities = predict_probabilities(self.model, self.tokenizer, texts, self.max_length, self.calibrator)
        if probabilities.shape[1] != len(self.labels):
            raise LowbitError(f"the model scores {probabilities.shape[1]} classes but {SETTINGS_FILE} names "
                              f"{len(self.labels)} labels: {', '.join(self.labels)}")
        ids = probabilities.argmax(axis=1).astype("int64")
        frame = pd.DataFrame({"label": [self.labels[i] for i in ids], "label_id": ids})
        for k, name in enumerate(self.labels):
            frame[probability_column(name)] = probabilities[:, k].astype("float64")
        return frame


mlflow.models.set_model(LowbitClassifier())
