"""PTQ and QAT on a tiny BERT: real int8 storage, reload gives the same predictions, QAT converts faithfully."""

import pytest
import torch

from lowbit.builtin_data import generate_reviews
from lowbit.config import ModelParams, QATParams
from lowbit.errors import LowbitError
from lowbit.measure import quantized_weight_stats, weight_bytes
from lowbit.models import load_classifier, load_tokenizer, param_counts
from lowbit.quant.modules import Int8Linear
from lowbit.quant.ptq import calibrate, linear_names, quantizable_layers
from lowbit.quant.qat import FakeQuantLinear, convert_qat, freeze_observers, prepare_qat
from lowbit.quant.scheme import SchemeContext
from lowbit.quant.schemes import SCHEMES
from lowbit.task_types.sequence_classification import make_loader, predict_logits
from lowbit.train import train
from lowbit.formats import discover, load_variant
from tests.tiny_model import tiny_classifier_dir

MODEL = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_classifier_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def frame():
    data = generate_reviews(96, seed=3)
    return data.assign(label=data["label"].map({"negative": 0, "neutral": 1, "positive": 2}))


def load(tiny_dir):
    return load_classifier(str(tiny_dir), MODEL), load_tokenizer(str(tiny_dir), MODEL)


def test_skip_modules_and_embeddings_choose_the_layers(tiny_dir):
    model, _ = load(tiny_dir)
    layers = quantizable_layers(model, ["classifier"], embeddings=True)
    assert "classifier" not in layers and "bert.embeddings.word_embeddings" in layers
    assert not any(n.startswith("bert.encoder.layer.0") for n in quantizable_layers(model, ["bert.encoder.layer.0.*"]))


def test_a_model_without_quantizable_layers_is_explained(tiny_dir):
    model, _ = load(tiny_dir)
    with pytest.raises(LowbitError, match="no quantizable nn.Linear layers left.*bert.encoder.layer.0.attention.self.query"):
        quantizable_layers(model, ["bert", "classifier"])


def test_empty_calibration_is_explained(tiny_dir):
    model, _ = load(tiny_dir)
    with pytest.raises(LowbitError, match="calib split is empty"):
        calibrate(model, [], ["classifier"], "minmax")


def test_every_scheme_saves_real_low_bit_storage_and_reloads_to_the_same_predictions(tiny_dir, frame, tmp_path):
    model, tokenizer = load(tiny_dir)
    fp32_logits, _ = predict_logits(model, make_loader(tokenizer, frame, 32, 32))
    batches = list(make_loader(tokenizer, frame.iloc[:32], 16, 32))
    ctx = SchemeContext(tiny_dir, tmp_path / "ptq", MODEL, ["classifier"], True, ["minmax", "entropy"], 99.9, 128, lambda: batches)
    for name, scheme in SCHEMES.items():
        if name != "int8_static_compiled":  # compiles on load: its own test, tests/unit/test_compiled.py
            scheme.build(ctx)
    found = discover(tmp_path)
    assert set(found) == {"half_bf16", "half_fp16", "ptq_int8_weight_only", "ptq_int8_dynamic", "ptq_int8_static_minmax",
                          "ptq_int8_static_entropy", "ptq_int4_weight_only", "ptq_nf4", "ptq_int8_bnb"}
    fp32_bytes = weight_bytes(model)
    for variant, path in found.items():
        reloaded, _ = load_variant(path, MODEL)
        again, _ = load_variant(path, MODEL)
        logits, _ = predict_logits(reloaded, make_loader(tokenizer, frame, 32, 32))
        torch.testing.assert_close(logits, predict_logits(again, make_loader(tokenizer, frame, 32, 32))[0])
        assert param_counts(reloaded)[1] == param_counts(model)[1], variant
        assert abs(logits - fp32_logits).max() < 0.5, variant  # close to fp32, not garbage
        if variant.startswith(("ptq_int8_s", "ptq_int8_d", "ptq_int8_w")):
            assert weight_bytes(reloaded) < 0.3 * fp32_bytes, variant
            assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, Int8Linear)


def test_nf4_base_weights_are_packed_4bit_with_double_quantized_scales(tiny_dir, tmp_path):
    ctx = SchemeContext(tiny_dir, tmp_path, MODEL, ["classifier"], True, [], 99.9, 128, list)
    SCHEMES["nf4"].build(ctx)
    model, _ = load_variant(tmp_path / "ptq_nf4", MODEL)
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    assert weight.dtype == torch.uint8 and weight.numel() == 32 * 32 // 2
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested
    count, held = quantized_weight_stats(model)
    assert count == param_counts(model)[1] - weight_bytes_free_params(model)  # every Linear but the head is 4-bit
    assert held > count // 2  # packed nibbles plus block scales; bits per weight on the real model: bench/quant.py
    assert model.classifier.weight.dtype == torch.float32  # the head stays out of quantization


def weight_bytes_free_params(model) -> int:
    """Parameters that stay float in an NF4 model: embeddings, LayerNorms, biases, the head."""
    return sum(p.numel() for p in model.parameters() if p.dtype != torch.uint8)


def test_qat_can_start_from_calibrated_ranges_and_keep_them(tiny_dir, frame):
    model, tokenizer = load(tiny_dir)
    layers = quantizable_layers(model, ["classifier"], embeddings=True)
    batches = list(make_loader(tokenizer, frame.iloc[:32], 16, 32))
    ranges = calibrate(model, batches, linear_names(layers), "percentile", 99.9)
    prepare_qat(model, layers, ranges)
    name = "bert.encoder.layer.1.output.dense"
    fake = model.get_submodule(name)
    for observer, calibrated in ((fake.input_observer, ranges[name][0]), (fake.output_observer, ranges[name][1])):
        scale, zero_point = observer.qparams()
        assert scale == pytest.approx(calibrated[0], rel=1e-6) and zero_point == calibrated[1]
    freeze_observers(model)
    cfg = QATParams(epochs=1, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0, weight_decay=0.0,
                    max_grad_norm=1.0, group_by_length=False, seed=0, init_observer="percentile", observer_freeze_fraction=0.0)
    train(model, tokenizer, frame.iloc[:64], frame.iloc[64:], cfg, 32)
    assert fake.output_observer.qparams() == pytest.approx(ranges[name][1], rel=1e-6)  # frozen: training left it alone
    convert_qat(model)
    int8 = model.get_submodule(name)
    assert float(int8.output_scale) == pytest.approx(ranges[name][1][0], rel=1e-6)
    assert int(int8.output_zero_point) == ranges[name][1][1]


def test_qat_trains_through_fake_quant_and_converts_to_matching_int8(tiny_dir, frame):
    model, tokenizer = load(tiny_dir)
    prepare_qat(model, quantizable_layers(model, ["classifier"], embeddings=True))
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, FakeQuantLinear)
    cfg = QATParams(epochs=2, learning_rate=5e-3, batch_size=16, warmup_ratio=0.0, weight_decay=0.0,
                    max_grad_norm=1.0, group_by_length=False, seed=0, init_observer="ema", observer_freeze_fraction=0.5)
    before = query.weight.detach().clone()
    result = train(model, tokenizer, frame.iloc[:64], frame.iloc[64:], cfg, 32, on_step=lambda s: s == 4 and freeze_observers(model))
    assert not torch.equal(before, query.weight.detach())  # gradients flowed through fake quantization (STE)
    assert query.input_observer.observing is False
    fake_logits, _ = predict_logits(model, make_loader(tokenizer, frame, 32, 32))
    layout = convert_qat(model)
    assert layout["bert.encoder.layer.0.attention.self.query"] == "linear:static"
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]  # it learns through fake quantization
    int8_logits, _ = predict_logits(model, make_loader(tokenizer, frame, 32, 32))
    assert abs(int8_logits - fake_logits).max() < 0.05  # the converted model computes what QAT trained
