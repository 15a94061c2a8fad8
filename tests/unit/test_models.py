import time
from pathlib import Path

import pytest
import torch

from lowbit.config import ModelParams
from lowbit.errors import LowbitError
from lowbit.models import load_classifier, param_counts, resolve_model
from tests.tiny_model import tiny_classifier_dir

MODEL = ModelParams(task="sequence_classification", name="embedded:minilm-l6", trust_remote_code=False, max_length=32)


def test_embedded_minilm_resolves_to_a_safetensors_directory():
    path = Path(resolve_model("embedded:minilm-l6"))
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def test_embedded_minilm_loads_as_a_classifier_with_our_labels():
    model = load_classifier(resolve_model("embedded:minilm-l6"), MODEL, ["neg", "pos"])
    assert model.config.num_labels == 2 and model.config.id2label == {0: "neg", 1: "pos"}
    trainable, total = param_counts(model)
    assert trainable == total and 22_000_000 < total < 23_500_000  # all-MiniLM-L6-v2: 22.7M with the head


def test_unknown_embedded_and_bad_local_dirs_are_explained(tmp_path):
    with pytest.raises(LowbitError, match="unknown embedded model 'bert'; embedded: minilm-l6"):
        resolve_model("embedded:bert")
    with pytest.raises(LowbitError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(LowbitError, match="directory not found"):
        resolve_model(str(tmp_path / "missing"))


def test_hub_id_offline_fails_fast_naming_offline_models(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(LowbitError) as err:
        resolve_model("prajjwal1/bert-tiny")
    assert time.perf_counter() - started < 10
    assert "model.name" in str(err.value) and "embedded:minilm-l6" in str(err.value)


def test_pickled_weights_are_never_loaded(tmp_path):
    source = tiny_classifier_dir(tmp_path / "tiny")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((source / "config.json").read_text())
    model = load_classifier(str(source), MODEL)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(LowbitError, match="cannot load safetensors weights"):
        load_classifier(str(pickled), MODEL)
