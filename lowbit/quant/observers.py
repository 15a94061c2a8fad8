"""Calibration observers: watch a tensor over calibration batches, then give (scale, zero_point).

Activations are quantized per tensor, asymmetric, to 7-bit values in uint8 storage
(affine.ACTIVATION: what x86 int8 GEMMs take without saturating).

  minmax      the observed min and max (torch.ao MinMaxObserver)
  mse         the clipping range that minimises the L2 quantization error over a
              histogram (torch.ao HistogramObserver's search)
  percentile  clip at the p-th and (100−p)-th percentiles of the observed values
              (lowbit: a seeded reservoir sample of every batch's values)
  entropy     TensorRT-style KL calibration: over a 2048-bin histogram of |x|, the
              threshold T whose 128-level quantized distribution diverges least
              (KL) from the clipped original; range = [max(min, −T), min(max, T)] (lowbit)

All observers reject NaN or inf, naming the layer, since one such value poisons a range.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

from lowbit.errors import LowbitError
from lowbit.quant.affine import ACTIVATION, qparams

class Observer:
    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise LowbitError(
                f"calibration: layer {self.layer!r} produced NaN or inf activations; check the model's weights "
                "and the calib split, or keep this layer in float with ptq.skip_modules"
            )
        self.batches += 1
        self._observe(x)

    def qparams(self) -> tuple[float, int]:
        if not self.batches:
            raise LowbitError(f"calibration: layer {self.layer!r} saw no data; is the calib split empty?")
        scale, zero_point = self._qparams()
        return float(scale), int(zero_point)


class TorchObserver(Observer):
    factory = MinMaxObserver

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.inner = self.factory(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=True)  # = ACTIVATION

    def _observe(self, x):
        self.inner(x)

    def _qparams(self):
        scale, zero_point = self.inner.calculate_qparams()
        return scale.item(), zero_point.item()


class MinMax(TorchObserver):
    factory = MinMaxObserver


class MSE(TorchObserver):
    factory = HistogramObserver


class Percentile(Observer):
    def __init__(self, layer: str, percentile: float = 99.99, sample_size: int = 1 << 20) -> None:
        super().__init__(layer)
        self.percentile, self.sample_size = percentile, sample_size
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def _observe(self, x):
        flat = x.flatten()
        keep = max(1, self.sample_size // 16)
        if flat.numel() > keep:
            flat = flat[torch.randint(flat.numel(), (keep,), generator=self.generator)]
        self.samples.append(flat)

    def _qparams(self):
        values = torch.cat(self.samples).double().numpy()
        low, high = np.percentile(values, [100 - self.percentile, self.percentile])
        return qparams(torch.tensor(low), torch.tensor(high), ACTIVATION, symmetric=False)


class Entropy(Observer):
    bins, levels = 2048, 128

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.abs_max, self.x_min, self.x_max = 0.0, float("inf"), float("-inf")

    def _observe(self, x):
        self.x_min, self.x_max = min(self.x_min, x.min().item()), max(self.x_max, x.max().item())
        new_max = max(self.abs_max, x.abs().max().item(), 1e-8)
        if new_max > self.abs_max and self.hist.sum() > 0:  # widen: move old counts to the bins of the new range
            centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.abs_max / self.bins
            target = torch.clamp((centres / new_max * self.bins).long(), max=self.bins - 1)
            self.hist = torch.bincount(target, weights=self.hist, minlength=self.bins).double()
        self.abs_max = new_max
        self.hist += torch.histc(x.abs().double(), self.bins, 0, self.abs_max)

    def _qparams(self):
        threshold = kl_threshold(self.hist.numpy(), self.abs_max, self.levels)
        return qparams(torch.tensor(max(self.x_min, -threshold)), torch.tensor(min(self.x_max, threshold)), ACTIVATION, symmetric=False)


def kl_threshold(hist: np.ndarray, abs_max: float, levels: int) -> float:
    """The |x| threshold minimising KL(P‖Q) between clipped and quantized histograms."""
    bins = len(hist)
    best_kl, best_i = np.inf, bins
    for i in range(levels, bins + 1, 16):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # reference: clipped mass piles up in the last bin
        nonzero = p > 0
        q = np.zeros(i)
        for chunk in np.array_split(np.arange(i), levels):  # candidate: the unclipped slice at `levels` levels,
            mass, support = hist[chunk].sum(), nonzero[chunk].sum()  # so clipping away mass costs divergence
            if support:
                q[chunk] = np.where(nonzero[chunk], mass / support, 0)
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum == 0 or q_sum == 0:
            continue
        pn, qn = p / p_sum, q / q_sum
        mask = pn > 0
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / np.maximum(qn[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i / bins * abs_max


# The registry of calibration observers: params.yaml validation (ptq.observers, qat.init_observer) reads it.
# Each takes (layer name for messages, the ptq.percentile setting).
OBSERVERS: dict[str, Callable[[str, float], Observer]] = {
    "minmax": lambda layer, percentile: MinMax(layer),
    "percentile": Percentile,
    "mse": lambda layer, percentile: MSE(layer),
    "entropy": lambda layer, percentile: Entropy(layer),
}


def make_observer(name: str, layer: str, percentile: float = 99.99) -> Observer:
    if name not in OBSERVERS:
        raise LowbitError(f"params.yaml: ptq.observers: {name!r} is not one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name](layer, percentile)
