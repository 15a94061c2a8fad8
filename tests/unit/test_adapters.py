"""LoRA / QLoRA invariants on a tiny BERT: merge preserves logits, QLoRA's base is NF4, adapters round-trip."""

import numpy as np
import pytest
import torch

from lowbit.adapters import (
    check_adapter_base, dequantized_4bit_weights, load_4bit_base, load_adapter_model, lora_model, merged_model,
)
from lowbit.builtin_data import generate_reviews
from lowbit.config import LoraParams, ModelParams, QLoraParams
from lowbit.errors import LowbitError
from lowbit.io import write_json
from lowbit.models import load_classifier, load_tokenizer, param_counts
from lowbit.task_types.sequence_classification import make_loader, predict_logits
from lowbit.train import train
from tests.tiny_model import tiny_classifier_dir

MODEL = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)
LABELS = ["negative", "neutral", "positive"]
COMMON = dict(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"], bias="none", epochs=3,
              learning_rate=3e-2, batch_size=16, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, group_by_length=False, seed=0)
LORA = LoraParams(**COMMON)
QLORA = QLoraParams(**COMMON, compute_dtype="float32", gradient_checkpointing=False, requantize_merged="none")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_classifier_dir(tmp_path_factory.mktemp("tiny") / "model", init_std=0.3)


@pytest.fixture(scope="module")
def frame():
    data = generate_reviews(120, seed=5)
    return data.assign(label=data["label"].map({name: i for i, name in enumerate(LABELS)}))


def logits(model, tokenizer, frame):
    return predict_logits(model, make_loader(tokenizer, frame, 32, 32))[0]


def trained_lora(tiny_dir, frame, params=LORA):
    tokenizer = load_tokenizer(str(tiny_dir), MODEL)
    model = lora_model(load_classifier(str(tiny_dir), MODEL, LABELS), params)
    result = train(model, tokenizer, frame.iloc[:96], frame.iloc[96:], params, 32)
    return model, tokenizer, result


def train_loss(model, tokenizer, frame) -> float:
    scores, labels = predict_logits(model, make_loader(tokenizer, frame, 32, 32))
    return float(torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor(labels)))


def test_lora_trains_only_adapters_and_head_and_lowers_the_loss(tiny_dir):
    tokenizer = load_tokenizer(str(tiny_dir), MODEL)
    data = generate_reviews(360, seed=1)
    data = data.assign(label=data["label"].map({name: i for i, name in enumerate(LABELS)}))
    params = LoraParams(**(COMMON | {"target_modules": "all-linear", "r": 8, "epochs": 4, "learning_rate": 1e-2}))
    model = lora_model(load_classifier(str(tiny_dir), MODEL, LABELS), params)
    before = train_loss(model, tokenizer, data.iloc[:300])
    train(model, tokenizer, data.iloc[:300], data.iloc[300:], params, 32)
    trainable, total = param_counts(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n for n in names)
    assert trainable < 0.05 * total
    after = train_loss(model, tokenizer, data.iloc[:300])
    assert after < before - 0.05, (before, after)


def test_merge_then_unmerge_leaves_logits_unchanged(tiny_dir, frame):
    model, tokenizer, _ = trained_lora(tiny_dir, frame)
    before = logits(model, tokenizer, frame)
    model.merge_adapter()
    np.testing.assert_allclose(logits(model, tokenizer, frame), before, atol=1e-5)  # W0 + (alpha/r)·B·A, fp32
    model.unmerge_adapter()
    np.testing.assert_allclose(logits(model, tokenizer, frame), before, atol=1e-5)


def test_saved_adapter_reloads_to_the_same_outputs_and_merged_copy_matches(tiny_dir, frame, tmp_path):
    model, tokenizer, _ = trained_lora(tiny_dir, frame)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    card = {"variant": "lora", "format": "peft", "stage": "lora", "base_model": str(tiny_dir), "labels": LABELS}
    write_json(tmp_path / "adapter" / "lowbit_variant.json", card)
    expected = logits(model, tokenizer, frame)
    reloaded, _ = load_adapter_model(tmp_path / "adapter", card, MODEL)
    np.testing.assert_allclose(logits(reloaded, tokenizer, frame), expected, atol=1e-6)
    merged = merged_model(tmp_path / "adapter", load_classifier(str(tiny_dir), MODEL, LABELS))
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # no adapter layer remains
    np.testing.assert_allclose(logits(merged, tokenizer, frame), expected, atol=1e-5)


def test_qlora_base_is_nf4_with_double_quantization_and_merges_into_its_dequantized_weights(tiny_dir, frame, tmp_path):
    import bitsandbytes as bnb

    tokenizer = load_tokenizer(str(tiny_dir), MODEL)
    model = lora_model(load_4bit_base(str(tiny_dir), MODEL, {"labels": LABELS}, QLORA), QLORA, "qlora")
    base_query = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer
    assert isinstance(base_query, bnb.nn.Linear4bit)
    state = base_query.weight.quant_state
    assert state.quant_type == "nf4" and state.nested and base_query.weight.dtype == torch.uint8
    assert not isinstance(model.base_model.model.classifier.original_module, bnb.nn.Linear4bit)  # head stays float
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # adapters full precision
    train(model, tokenizer, frame.iloc[:96], frame.iloc[96:], QLORA, 32)
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model, tokenizer, frame)
    weights = dequantized_4bit_weights(model)
    assert "bert.encoder.layer.0.attention.self.query" in weights and "classifier" not in weights
    merged = merged_model(tmp_path / "adapter", load_classifier(str(tiny_dir), MODEL, LABELS), weights)
    np.testing.assert_allclose(logits(merged, tokenizer, frame), expected, atol=1e-4)


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        LoraParams(**(COMMON | {"r": 0}))


def test_target_modules_matching_nothing_lists_the_linear_layers(tiny_dir):
    params = LoraParams(**(COMMON | {"target_modules": ["q_proj"]}))
    with pytest.raises(LowbitError) as err:
        lora_model(load_classifier(str(tiny_dir), MODEL, LABELS), params)
    message = str(err.value)
    assert "lora.target_modules: ['q_proj'] match no layer" in message
    assert "query" in message and "dense" in message and "classifier" in message


def test_an_adapter_from_another_base_is_refused(tiny_dir, tmp_path):
    (tmp_path / "adapter").mkdir()
    write_json(tmp_path / "adapter" / "adapter_config.json", {"base_model_name_or_path": "/models/some-other-bert"})
    card = {"base_model": str(tiny_dir), "labels": LABELS}
    with pytest.raises(LowbitError, match="trained on base '/models/some-other-bert'"):
        check_adapter_base(tmp_path / "adapter", card)


def test_a_merge_that_costs_more_than_allowed_fails_with_the_figures(monkeypatch, params):
    import tasks.adapter_stage as stage

    scores = iter([0.90, 0.85])  # adapter model, then the merged copy reloaded from disk
    monkeypatch.setattr(stage.task_type(params.model), "validation_score", lambda model, loader: next(scores))
    monkeypatch.setattr(stage, "load_variant", lambda path, model: (None, None))
    with pytest.raises(LowbitError) as err:
        stage.merge_check(object(), None, params, [], "qlora")
    message = str(err.value)
    assert "merging cost 5.00 validation accuracy points (0.9000 -> 0.8500)" in message
    assert "export.max_merge_drop=1" in message and "qlora.requantize_merged: none" in message
    scores = iter([0.90, 0.895])
    assert stage.merge_check(object(), None, params, [], "lora")["merge_accuracy_drop"] == pytest.approx(0.5)
