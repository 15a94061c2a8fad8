"""int4_weight_only: per-group symmetric int4 weights, two per byte, dequantized per call.

The storage GPTQ/AWQ-style LLM checkpoints use. For each quantized Linear [out, in]:
  weight_packed  uint8 [out·in/2]      two int4 values per byte, low nibble first (affine.pack_int4)
  weight_scale   fp32  [out, in/group] one symmetric scale per group of `group` input weights
  bias           fp32  [out]
so a weight costs 4 + 32/group bits (4.25 at group 128). Activations stay fp32: the forward
pass rebuilds the fp32 weight and multiplies (memory saving, not a speed-up). The group is
ptq.int4_group_size where it divides the layer's input width, else its largest divisor below
that. Embeddings: int8 per row (ptq.quantize_embeddings) or FP32; ptq.skip_modules stay FP32.

Storage format `int4`: model config, tokenizer, model.safetensors, and a card whose layout
names each module ("linear:int4:<group>" or "embedding").

Why not torchao (0.18, measured on MiniLM's 36 encoder linears): `Int4WeightOnlyConfig` has no
CPU path (its formats need CUDA/XPU kernels); the prototype CPU config packs weights in a layout
that depends on the CPU (64-row blocks on AVX512, 32 on AVX2: a layer packed on AVX512 gave
errors 19x the output's spread when run on AVX2), cannot be saved to safetensors, and is 70x
slower than fp32 with fp32 activations; `IntxWeightOnlyConfig` stores one int4 value per byte
(twice these bytes) and computes the same dequantize-then-linear. This format is portable and plain.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.task_types import load_saved
from lowbit.quant.affine import INT4, pack_int4, quantize_tensor, unpack_int4
from lowbit.quant.modules import Int8Embedding
from lowbit.quant.ptq import int8_shell, quantizable_layers, set_module
from lowbit.quant.scheme import Scheme, SchemeContext, embedding_note, skip_note
from lowbit.quant.storage import load_quantized, save_quantized

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams

VARIANT = "ptq_int4_weight_only"


def group_size_for(width: int, requested: int) -> int:
    """`requested` if it divides `width`, else the largest divisor of `width` below it."""
    return next(g for g in range(min(requested, width), 0, -1) if width % g == 0)


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = True) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide the input width {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.zeros((in_features * out_features + 1) // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // group_size))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        module = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        q, scale, _ = quantize_tensor(linear.weight.detach().float(), INT4, symmetric=True, group_size=group_size)
        module.weight_packed.copy_(pack_int4(q))
        module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 weight [out, in] the layer computes with: q · scale, group by group."""
        groups = self.in_features // self.group_size
        q = unpack_int4(self.weight_packed, self.in_features * self.out_features, signed=True)
        weight = q.reshape(self.out_features, groups, self.group_size).float() * self.weight_scale.unsqueeze(-1)
        return weight.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def quantized_weight_stats(self) -> tuple[int, int]:
        """(int4 weights, their bytes with the group scales): read by measure.quantized_weight_stats."""
        held = self.weight_packed.numel() + self.weight_scale.numel() * self.weight_scale.element_size()
        return self.in_features * self.out_features, held

    def logical_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}"


def quantize_int4(model: nn.Module, layers: dict[str, nn.Module], group_size: int) -> dict[str, str]:
    """Replace Linears by Int4Linear and Embeddings by Int8Embedding, in place; returns the card's layout."""
    layout = {}
    for name, module in layers.items():
        if isinstance(module, nn.Embedding):
            set_module(model, name, Int8Embedding.from_float(module))
            layout[name] = "embedding"
        else:
            group = group_size_for(module.in_features, group_size)
            set_module(model, name, Int4Linear.from_float(module, group))
            layout[name] = f"linear:int4:{group}"
    return layout


def build(ctx: SchemeContext) -> list[str]:
    model, tokenizer = load_saved(ctx.baseline_dir, ctx.model)
    layout = quantize_int4(model, quantizable_layers(model, ctx.skip_modules, ctx.quantize_embeddings), ctx.int4_group_size)
    groups = sorted({kind.rsplit(":", 1)[1] for kind in layout.values() if kind.startswith("linear")}, key=int)
    save_quantized(model, tokenizer, ctx.out_root / VARIANT, VARIANT, "int4", layout, embedding_note(ctx) + skip_note(ctx) + [
        f"int4 weights per group of {', '.join(groups)} input weights (symmetric, fp32 scales), fp32 activations"])
    return [VARIANT]


def int4_shell(kind: str, float_module: nn.Module) -> nn.Module:
    """An empty Int4Linear ("linear:int4:<group>") or Int8Embedding ("embedding") in the float module's place."""
    if kind == "embedding":
        return int8_shell(kind, float_module)
    return Int4Linear(float_module.in_features, float_module.out_features, int(kind.rsplit(":", 1)[1]),
                      bias=float_module.bias is not None)


def load_int4(path: Path, card: dict, model: ModelParams):
    return load_quantized(path, card, model, int4_shell)


SCHEMES = (Scheme("int4_weight_only", build, variants=(VARIANT,), order=60),)
FORMATS = {"int4": load_int4}
