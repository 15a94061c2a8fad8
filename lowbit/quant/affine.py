"""Affine (scale / zero-point) quantization: the maths, per tensor, per channel, per group.

    scale      = (x_max − x_min) / (q_max − q_min)
    zero_point = q_min − round(x_min / scale)             (asymmetric), clamped to [q_min, q_max]
    q          = clamp(round(x / scale) + zero_point, q_min, q_max)
    x̂          = (q − zero_point) · scale

Symmetric: the range is [−max|x|, max|x|], so scale = 2·max|x| / (q_max − q_min) and
the zero point is fixed: 0 for signed ranges, the midpoint (128 for uint8) for unsigned.
Round-trip error |x − x̂| ≤ scale / 2 for every x inside [x_min, x_max].

Worked examples (tests/unit/test_affine.py reproduces them):
  [0, 1000]   -> uint8: scale = 1000/255 ≈ 3.92, zero point 0, 250 -> 64
  [-20, 1000] -> uint8: scale = 1020/255 = 4.0, zero point 5, -20 -> 0, 1000 -> 255

Shapes: per-tensor qparams are scalars; per-channel along `axis` have one value per
channel; per-group split the last dimension into groups of `group_size` columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QRange:
    bits: int
    signed: bool

    @property
    def q_min(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def q_max(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype: int8/uint8 (4-bit values are stored one per byte until packed)."""
        return torch.int8 if self.signed else torch.uint8


INT8, UINT8, INT4, UINT4 = QRange(8, True), QRange(8, False), QRange(4, True), QRange(4, False)

# Activations for x86 int8 GEMMs: fbgemm multiplies u8×s8 pairs into int16 and saturates when
# activations use all 8 bits; 7-bit activations (0..127, stored as uint8) keep results exact
# (torch's x86 qconfig does the same, "reduce_range"). Measured error without it: 30x the bound.
ACTIVATION = QRange(7, False)


def qparams(x_min: torch.Tensor, x_max: torch.Tensor, qrange: QRange, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ranges [x_min, x_max] (tensors of any matching shape).

    The range is widened to include 0 so that 0 is exactly representable (padding,
    ReLU outputs); a zero-width range gets scale 1 rather than a division by zero.
    """
    x_min = torch.minimum(torch.as_tensor(x_min, dtype=torch.float64), torch.zeros(()))
    x_max = torch.maximum(torch.as_tensor(x_max, dtype=torch.float64), torch.zeros(()))
    span = qrange.q_max - qrange.q_min
    if symmetric:
        bound = torch.maximum(-x_min, x_max)
        scale = 2 * bound / span
        midpoint = 0 if qrange.signed else (qrange.q_max + qrange.q_min + 1) // 2
        zero_point = torch.full_like(scale, midpoint)
    else:
        scale = (x_max - x_min) / span
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(qrange.q_min - torch.round(x_min / scale), qrange.q_min, qrange.q_max)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(torch.float32), zero_point.to(torch.int32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qrange: QRange) -> torch.Tensor:
    q = torch.round(x.to(torch.float64) / scale.to(torch.float64)) + zero_point
    return torch.clamp(q, qrange.q_min, qrange.q_max).to(qrange.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return ((q.to(torch.int32) - zero_point).to(torch.float32)) * scale


def _reduce_except(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max along `axis`, shaped to broadcast against x."""
    moved = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return moved.min(dim=1).values.reshape(shape), moved.max(dim=1).values.reshape(shape)


def quantize_tensor(x: torch.Tensor, qrange: QRange, symmetric: bool, axis: int | None = None, group_size: int | None = None):
    """Quantize with qparams from x's own range: per tensor (axis None), per channel, or per group.

    Returns (q, scale, zero_point); `dequantize(q, scale, zero_point)` reconstructs x
    (for groups, q has shape [..., groups, group_size]).
    """
    if group_size is not None:
        if x.shape[-1] % group_size:
            raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of group_size {group_size}")
        x = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        x_min, x_max = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    elif axis is not None:
        x_min, x_max = _reduce_except(x, axis)
    else:
        x_min, x_max = x.min(), x.max()
    scale, zero_point = qparams(x_min, x_max, qrange, symmetric)
    return quantize(x, scale, zero_point, qrange), scale, zero_point


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte (low nibble first); q holds values in [0, 15] (uint4) or [-8, 7] (int4)."""
    flat = (q.to(torch.int16) & 0xF).to(torch.uint8).flatten()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    values = torch.stack([low, high], dim=1).flatten()[:numel].to(torch.int16)
    if signed:
        values = torch.where(values > 7, values - 16, values)
    return values.to(torch.int8 if signed else torch.uint8)
