import pytest
import torch
from torch import nn

from lowbit.measure import quantized_weight_stats, weight_bytes
from lowbit.quant.affine import ACTIVATION, qparams
from lowbit.quant.modules import Int8Embedding, Int8Linear


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(64, 32)


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_int8_linear_matches_float_within_quantization_error(mode):
    ref = linear()
    x = torch.randn(4, 10, 64)
    q = Int8Linear.from_float(ref, mode)
    err = (q(x) - ref(x)).abs().max().item()
    assert err < 0.05  # per-row int8 weights (+ per-batch uint8 inputs for dynamic) on unit-scale data
    assert err > 0.0  # it really is quantized


def test_static_int8_linear_uses_calibrated_ranges():
    ref = linear()
    x = torch.randn(8, 64)
    y = ref(x)
    in_q, out_q = (qparams(t.min(), t.max(), ACTIVATION, symmetric=False) for t in (x, y.detach()))
    q = Int8Linear.from_float(ref, "static", in_q, out_q)
    # input rounding (≤ in_scale/2 per element, through |W|) + weight rounding + output rounding
    assert (q(x) - y).abs().max().item() < 0.05


@pytest.mark.parametrize("mode", ["weight_only", "dynamic", "static"])
def test_int8_linear_state_dict_round_trip_is_plain_int8_and_exact(mode):
    ref = linear()
    qparams = (0.02, 128)
    q = Int8Linear.from_float(ref, mode, qparams, qparams)
    state = q.state_dict()
    assert state["weight_int8"].dtype == torch.int8 and state["weight_int8"].shape == (32, 64)
    assert all(t.dtype != torch.float32 or t.numel() <= 32 for t in state.values())  # only scales/bias in fp32
    fresh = Int8Linear(64, 32, mode)
    fresh.load_state_dict(state)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("mode", ["weight_only", "dynamic", "static"])
def test_int8_linear_weight_bytes_are_one_byte_per_weight_plus_scales(mode):
    q = Int8Linear.from_float(linear(), mode, (0.02, 128), (0.02, 128))
    scalars = 8 + 8 if mode == "static" else 0  # input/output scale (fp32) + zero point (int32)
    assert weight_bytes(q) == 32 * 64 + 32 * 4 + 32 * 4 + scalars
    assert quantized_weight_stats(q) == (32 * 64, 32 * 64 + 32 * 4)


def test_int8_embedding_per_row_error_bound_and_storage():
    torch.manual_seed(0)
    emb = nn.Embedding(100, 16)
    q = Int8Embedding.from_float(emb)
    ids = torch.arange(100)
    scale = emb.weight.abs().amax(dim=1, keepdim=True) * 2 / 255
    assert ((q(ids) - emb(ids)).abs() <= scale / 2 + 1e-6).all()
    assert weight_bytes(q) == 100 * 16 + 100 * 4


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode 'w4' is not one of"):
        Int8Linear(4, 4, "w4")
