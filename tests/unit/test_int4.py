"""int4_weight_only: error bound, packing, storage cost, group choice, and the saved variant round trip."""

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.builtin_data import generate_reviews
from lowbit.config import ModelParams
from lowbit.formats import load_variant
from lowbit.measure import quantized_weight_stats, weight_bytes
from lowbit.models import load_tokenizer
from lowbit.quant.scheme import SchemeContext
from lowbit.quant.schemes import SCHEMES
from lowbit.quant.schemes.int4 import Int4Linear, group_size_for
from lowbit.task_types.sequence_classification import make_loader, predict_logits
from tests.tiny_model import tiny_classifier_dir

MODEL = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)


@pytest.mark.parametrize("width, requested, group", [(384, 128, 128), (1536, 128, 128), (96, 128, 96), (200, 128, 100),
                                                     (32, 128, 32), (97, 64, 1)])
def test_group_size_is_the_largest_divisor_up_to_the_request(width, requested, group):
    assert group_size_for(width, requested) == group


def test_int4_round_trip_error_is_within_half_a_step_of_each_group():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    q = Int4Linear.from_float(linear, group_size=128)
    assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.numel() == 64 * 256 // 2  # two per byte
    assert q.weight_scale.shape == (64, 2)
    error = (q.dequantized_weight() - linear.weight.detach()).abs().reshape(64, 2, 128)
    half_step = q.weight_scale.unsqueeze(-1) / 2
    assert bool((error <= half_step * (1 + 1e-5)).all())
    # symmetric int4: the step is 2·max|w| / 15 for each group
    expected_scale = 2 * linear.weight.detach().reshape(64, 2, 128).abs().amax(-1) / 15
    torch.testing.assert_close(q.weight_scale, expected_scale)
    x = torch.randn(5, 256)
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.dequantized_weight(), linear.bias))


def test_int4_costs_four_bits_plus_the_group_scale():
    q = Int4Linear.from_float(nn.Linear(384, 384), group_size=128)
    count, held = quantized_weight_stats(q)
    assert count == 384 * 384
    assert 8 * held / count == pytest.approx(4 + 32 / 128)  # 4.25 bits: 0.53 bytes per weight
    assert weight_bytes(q) == held + 384 * 4  # plus the fp32 bias


def test_the_scheme_saves_packed_int4_and_reloads_to_the_same_predictions(tmp_path):
    tiny_dir = tiny_classifier_dir(tmp_path / "base", hidden_size=64)
    tokenizer = load_tokenizer(str(tiny_dir), MODEL)
    frame = generate_reviews(48, seed=0).assign(label=0)
    ctx = SchemeContext(tiny_dir, tmp_path / "ptq", MODEL, ["classifier"], True, [], 99.9, 128, list)
    assert SCHEMES["int4_weight_only"].build(ctx) == ["ptq_int4_weight_only"]
    model, _ = load_variant(tmp_path / "ptq" / "ptq_int4_weight_only", MODEL)
    again, _ = load_variant(tmp_path / "ptq" / "ptq_int4_weight_only", MODEL)
    loader = make_loader(tokenizer, frame, 16, 32)
    np.testing.assert_array_equal(predict_logits(model, loader)[0], predict_logits(again, loader)[0])
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.group_size == 64 for m in layers if m.in_features == 64)  # 64 wide: one group per row
    assert not isinstance(model.classifier, Int4Linear)  # ptq.skip_modules
    from lowbit.quant.modules import Int8Embedding

    count, held = quantized_weight_stats(model)
    embeddings = [m for m in model.modules() if isinstance(m, Int8Embedding)]
    # int4: half a byte per weight + one fp32 scale per 64; int8 embeddings: a byte per weight + one fp32 scale per row
    assert held == (sum(m.in_features * m.out_features * (0.5 + 4 / m.group_size) for m in layers)
                    + sum(m.num_embeddings * (m.embedding_dim + 4) for m in embeddings))
    assert count == sum(m.in_features * m.out_features for m in layers) + sum(m.weight_int8.numel() for m in embeddings)
