import pytest
import torch

from lowbit.quant.affine import (
    INT4, INT8, UINT4, UINT8, dequantize, pack_int4, qparams, quantize, quantize_tensor, unpack_int4,
)


def test_worked_example_0_to_1000_uint8():
    scale, zp = qparams(torch.tensor(0.0), torch.tensor(1000.0), UINT8, symmetric=False)
    assert scale.item() == pytest.approx(1000 / 255) and round(scale.item(), 2) == 3.92
    assert zp.item() == 0
    assert quantize(torch.tensor(250.0), scale, zp, UINT8).item() == 64


def test_worked_example_minus20_to_1000_uint8():
    scale, zp = qparams(torch.tensor(-20.0), torch.tensor(1000.0), UINT8, symmetric=False)
    assert scale.item() == pytest.approx(4.0)
    assert zp.item() == 5
    q = quantize(torch.tensor([-20.0, 1000.0]), scale, zp, UINT8)
    assert q.tolist() == [0, 255]


def test_signed_int8_uses_minus128_to_127_with_the_same_formulas():
    assert (INT8.q_min, INT8.q_max, UINT8.q_min, UINT8.q_max) == (-128, 127, 0, 255)
    scale, zp = qparams(torch.tensor(-20.0), torch.tensor(1000.0), INT8, symmetric=False)
    assert scale.item() == pytest.approx(4.0)
    assert zp.item() == -128 - round(-20 / 4.0)  # -123
    assert quantize(torch.tensor([-20.0, 1000.0]), scale, zp, INT8).tolist() == [-128, 127]


def test_symmetric_zero_points_are_fixed():
    scale, zp = qparams(torch.tensor(-3.0), torch.tensor(5.0), INT8, symmetric=True)
    assert zp.item() == 0 and scale.item() == pytest.approx(10 / 255)
    _, zp_u = qparams(torch.tensor(-3.0), torch.tensor(5.0), UINT8, symmetric=True)
    assert zp_u.item() == 128
    assert (INT4.q_min, INT4.q_max, UINT4.q_max) == (-8, 7, 15)


@pytest.mark.parametrize("qrange", [INT8, UINT8, INT4, UINT4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_is_at_most_half_a_step(qrange, symmetric):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    q, scale, zp = quantize_tensor(x, qrange, symmetric)
    err = (dequantize(q, scale, zp) - x).abs().max()
    assert err <= scale / 2 + 1e-6
    assert q.min() >= qrange.q_min and q.max() <= qrange.q_max


def test_per_channel_scales_follow_each_row():
    w = torch.stack([torch.linspace(-1, 1, 64), torch.linspace(-100, 100, 64)])
    q, scale, zp = quantize_tensor(w, INT8, symmetric=True, axis=0)
    assert scale.shape == (2, 1)
    assert scale[0].item() == pytest.approx(2 / 255) and scale[1].item() == pytest.approx(200 / 255)
    err = (dequantize(q, scale, zp) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-5)).all()  # +max lands exactly half a step from 127


def test_per_group_quantization_bounds_error_per_group():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    w[:, :32] *= 50  # one loud group per row
    q, scale, zp = quantize_tensor(w, INT4, symmetric=True, group_size=32)
    assert q.shape == (8, 4, 32) and scale.shape == (8, 4, 1)
    recon = dequantize(q, scale, zp).reshape(8, 128)
    assert ((recon - w).abs().reshape(8, 4, 32) <= scale / 2 + 1e-5).all()
    per_tensor = dequantize(*quantize_tensor(w, INT4, symmetric=True))
    assert (recon - w)[:, 32:].abs().mean() < (per_tensor - w)[:, 32:].abs().mean() / 4


def test_out_of_range_values_clamp():
    scale, zp = qparams(torch.tensor(0.0), torch.tensor(1000.0), UINT8, symmetric=False)
    assert quantize(torch.tensor([-50.0, 5000.0]), scale, zp, UINT8).tolist() == [0, 255]


@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_unpack_round_trip_halves_storage(signed):
    qrange = INT4 if signed else UINT4
    q = torch.randint(qrange.q_min, qrange.q_max + 1, (7, 9), generator=torch.Generator().manual_seed(2))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (63 + 1) // 2
    assert unpack_int4(packed, q.numel(), signed).reshape(7, 9).to(torch.int64).tolist() == q.tolist()
