"""The PT2E + torch.compile int8 variant on a tiny BERT: real int8 storage, same predictions, compile time measured."""

import numpy as np
import pytest
import torch

from lowbit.builtin_data import generate_reviews
from lowbit.config import ModelParams
from lowbit.errors import LowbitError
from lowbit.measure import quantized_weight_stats, weight_bytes
from lowbit.models import load_classifier, load_tokenizer, param_counts
from lowbit.quant.compiled import PROGRAM_FILE
from lowbit.quant.scheme import SchemeContext
from lowbit.quant.schemes import SCHEMES
from lowbit.task_types.sequence_classification import make_loader, predict_logits
from lowbit.formats import load_variant
from tests.tiny_model import tiny_classifier_dir

MODEL = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    tiny_dir = tiny_classifier_dir(root / "model", init_std=0.2)
    data = generate_reviews(96, seed=3)
    frame = data.assign(label=data["label"].map({"negative": 0, "neutral": 1, "positive": 2}))
    fp32, tokenizer = load_classifier(str(tiny_dir), MODEL), load_tokenizer(str(tiny_dir), MODEL)
    batches = list(make_loader(tokenizer, frame.iloc[:48], 16, 32))
    ctx = SchemeContext(tiny_dir, root / "ptq", MODEL, ["classifier"], True, [], 99.9, 128, lambda: batches)
    assert SCHEMES["int8_static_compiled"].build(ctx) == ["ptq_int8_static_compiled"]
    return fp32, tokenizer, frame, root / "ptq" / "ptq_int8_static_compiled"


def test_program_stores_int8_weights_once_and_counts_every_weight(built):
    fp32, _, _, path = built
    model, _ = load_variant(path, MODEL)
    int8_weights = sum(t.numel() for t in model.int8_weights())
    quantized = sum(m.weight.numel() for n, m in fp32.named_modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and n != "classifier")
    assert int8_weights == quantized  # every linear and embedding weight but the head, as int8
    assert param_counts(model)[1] == param_counts(fp32)[1]
    assert not any(p.dtype == torch.float32 and p.dim() == 2 and p.shape[0] > 8 for p in model.parameters())  # no FP32 copies
    assert weight_bytes(model) < 0.3 * weight_bytes(fp32)
    ops = {str(node.target) for node in model.graph.graph.nodes}
    assert not any("scaled_dot_product" in op for op in ops)  # attention exported as matmul + softmax, for Inductor to fuse
    assert "aten.softmax.int" in ops or "aten._softmax.default" in ops
    assert (path / PROGRAM_FILE).stat().st_size < 0.5 * weight_bytes(fp32)  # FP32 copies would make it > 1.0
    count, held = quantized_weight_stats(model)
    assert count == quantized and count < held < 1.2 * count  # int8 plus per-channel scales and zero points


def test_compiled_program_predicts_like_fp32_compiles_once_and_reports_its_compile_time(built):
    fp32, tokenizer, frame, path = built
    model, _ = load_variant(path, MODEL)
    loader = make_loader(tokenizer, frame, 32, 32)
    fp32_logits, _ = predict_logits(fp32, loader)
    logits, _ = predict_logits(model, loader)
    assert model.compile_seconds > 0
    first = model.compile_seconds
    again, _ = predict_logits(model, loader)  # same shapes: no new compilation
    assert model.compile_seconds == first
    np.testing.assert_allclose(logits, again)
    assert (logits.argmax(-1) == fp32_logits.argmax(-1)).mean() >= 0.9
    first_batch = {k: v for k, v in next(iter(loader)).items() if k != "labels"}
    with torch.no_grad():  # Inductor's fused kernels compute what the quantized graph means, run op by op
        reference = model.graph(**first_batch).logits.numpy()
    np.testing.assert_allclose(logits[: len(reference)], reference, atol=0.02 * np.abs(reference).max())
    one = {k: v[:1] for k, v in first_batch.items()}  # batch 1, as latency is timed
    np.testing.assert_allclose(model(**one).logits.numpy(), logits[:1], atol=1e-4, rtol=1e-4)
    ragged, _ = predict_logits(model, make_loader(tokenizer, frame.iloc[:37], 32, 32))  # a last batch of 5
    np.testing.assert_allclose(ragged, logits[:37], atol=1e-4, rtol=1e-4)
    assert model.compile_seconds == first  # one program for every shape: batch 1 and ragged batches compile nothing


def test_compiled_program_refuses_training(built):
    model, _ = load_variant(built[3], MODEL)
    with pytest.raises(LowbitError, match="inference-only"):
        model.train()
