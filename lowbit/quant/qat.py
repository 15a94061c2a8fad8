"""Quantization-aware training: fake-quantize while fine-tuning, then convert to real int8.

    layers = quantizable_layers(model, skip=["classifier"], embeddings=True)
    ranges = calibrate(model, calib_batches, linear_names(layers), "percentile")   # optional
    prepare_qat(model, layers, ranges)  # nn.Linear -> FakeQuantLinear, nn.Embedding -> FakeQuantEmbedding
    train(model, ..., on_step=lambda s: s == freeze_at and freeze_observers(model))
    layout = convert_qat(model)         # -> Int8Linear("static") / Int8Embedding, same format as static PTQ

Weights are fake-quantized exactly as Int8Linear stores them (int8, symmetric, per
output channel); activations at each linear's input and output per tensor (7-bit,
asymmetric). Activation ranges either start from a PTQ calibration and stay fixed (the
default: BERT's rare outlier activations stretch min/max ranges, and a percentile or
entropy range avoids that, exactly as in static PTQ), or follow an exponential moving
average of each batch's min/max for the first part of training and then freeze.
torch.fake_quantize_* pass gradients straight through inside the range (straight-through
estimator), so the weights learn to live with the fixed grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.affine import ACTIVATION, INT8, qparams
from lowbit.quant.modules import Int8Embedding, Int8Linear
from lowbit.quant.ptq import set_module


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    bound = weight.detach().abs().amax(dim=1)
    scale, zero_point = qparams(-bound, bound, INT8, symmetric=True)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, INT8.q_min, INT8.q_max)


class RangeObserver(nn.Module):
    """EMA of per-batch min/max; `observing` False freezes the range."""

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum, self.observing = momentum, True
        self.register_buffer("low", torch.tensor(float("nan")))
        self.register_buffer("high", torch.tensor(float("nan")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing and self.training:
            low, high = x.detach().min(), x.detach().max()
            if torch.isnan(self.low):
                self.low.copy_(low), self.high.copy_(high)
            else:
                self.low.lerp_(low, self.momentum), self.high.lerp_(high, self.momentum)
        if torch.isnan(self.low):  # never observed (eval before training): pass through
            return x
        scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACTIVATION.q_min, ACTIVATION.q_max)

    def qparams(self) -> tuple[float, int]:
        scale, zero_point = qparams(self.low, self.high, ACTIVATION, symmetric=False)
        return float(scale), int(zero_point)

    def start_from(self, scale: float, zero_point: int) -> None:
        """Take a calibrated range: the grid's ends, so that qparams() gives back the same pair."""
        self.low.fill_((ACTIVATION.q_min - zero_point) * scale)
        self.high.fill_((ACTIVATION.q_max - zero_point) * scale)


class FakeQuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same trainable parameters
        self.input_observer, self.output_observer = RangeObserver(), RangeObserver()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input_observer(x), fake_quant_weight(self.weight), self.bias)
        return self.output_observer(y)

    def to_int8(self) -> Int8Linear:
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight, plain.bias = self.weight, self.bias
        return Int8Linear.from_float(plain, "static", self.input_observer.qparams(), self.output_observer.qparams())


class FakeQuantEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fake_quant_weight(self.embedding.weight), self.embedding.padding_idx)

    def to_int8(self) -> Int8Embedding:
        return Int8Embedding.from_float(self.embedding)


def prepare_qat(model: nn.Module, layers: dict[str, nn.Module], ranges: dict | None = None) -> None:
    """Swap in fake-quantized modules; `ranges` (from ptq.calibrate) sets their activation ranges."""
    for name, module in layers.items():
        if isinstance(module, nn.Embedding):
            set_module(model, name, FakeQuantEmbedding(module))
            continue
        fake = FakeQuantLinear(module)
        if ranges is not None:
            input_q, output_q = ranges[name]
            fake.input_observer.start_from(*input_q)
            fake.output_observer.start_from(*output_q)
        set_module(model, name, fake)


def freeze_observers(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, RangeObserver):
            module.observing = False


@torch.no_grad()
def convert_qat(model: nn.Module) -> dict[str, str]:
    layout = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, (FakeQuantLinear, FakeQuantEmbedding)):
            set_module(model, name, module.to_int8())
            layout[name] = "linear:static" if isinstance(module, FakeQuantLinear) else "embedding"
    return layout
