import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.observers import OBSERVERS, make_observer


def observed(name, batches, **kw):
    obs = make_observer(name, "layer.x", **kw)
    for batch in batches:
        obs.observe(batch)
    return obs.qparams()


def batches_with_outlier():
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 32, generator=gen) for _ in range(8)]
    data[3][0, 0] = 100.0  # one extreme activation
    return data


def test_minmax_covers_the_full_observed_range():
    scale, zp = observed("minmax", batches_with_outlier())
    low = min(b.min().item() for b in batches_with_outlier())
    assert scale == pytest.approx((100.0 - low) / 127, rel=1e-4)  # 7-bit activation range
    assert zp == round(-low / scale)


@pytest.mark.parametrize("name", ["percentile", "entropy"])
def test_clipping_observers_ignore_a_single_outlier(name):
    scale, _ = observed(name, batches_with_outlier())
    minmax_scale, _ = observed("minmax", batches_with_outlier())
    assert scale < minmax_scale / 5  # the outlier is clipped, not stretching the range 20x
    assert scale * 127 > 4.0  # but the bulk of N(0,1) (about ±3) still fits


def l2_error(data: torch.Tensor, scale: float, zp: int) -> float:
    q = torch.fake_quantize_per_tensor_affine(data, scale, zp, 0, 127)
    return float(((q - data) ** 2).sum())


@pytest.mark.parametrize("tail", [1, 400])
def test_mse_observer_minimises_l2_error_among_observers(tail):
    # One outlier is cheaper to keep than to clip (L2); a heavy tail of them too.
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(64, 32, generator=gen) for _ in range(8)]
    data[0].view(-1)[:tail] = 12.0
    everything = torch.cat([d.flatten() for d in data])
    errors = {name: l2_error(everything, *observed(name, data)) for name in OBSERVERS}
    assert errors["mse"] <= min(errors.values()) * 1.05


def test_percentile_is_configurable():
    wide, _ = observed("percentile", batches_with_outlier(), percentile=99.999)
    narrow, _ = observed("percentile", batches_with_outlier(), percentile=99.0)
    assert narrow < wide


@pytest.mark.parametrize("name", OBSERVERS)
def test_nan_or_inf_names_the_layer(name):
    obs = make_observer(name, "bert.encoder.layer.3.output.dense (input)")
    with pytest.raises(LowbitError, match=r"bert\.encoder\.layer\.3\.output\.dense \(input\).*NaN or inf"):
        obs.observe(torch.tensor([1.0, math.inf]))


def test_an_observer_that_saw_nothing_says_so():
    with pytest.raises(LowbitError, match="saw no data"):
        make_observer("minmax", "classifier (input)").qparams()


def test_unknown_observer_lists_the_known_ones():
    with pytest.raises(LowbitError, match="'kl' is not one of minmax, percentile, mse, entropy"):
        make_observer("kl", "x")
