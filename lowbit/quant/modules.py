"""Modules that hold real int8 weights and run int8 kernels (x86: fbgemm / oneDNN via torch).

Int8Linear  y = x·Wᵀ + b, W stored as int8 with one symmetric scale per output channel
            ([out, in] int8 + [out] fp32). Modes:
              weight_only  activations stay fp32; W is dequantized per call (memory saving, no int8 GEMM)
              dynamic      activations quantized per call (uint8, per tensor) → int8 GEMM
              static       activations quantized with calibrated (scale, zero point) → int8 GEMM →
                           output requantized with calibrated output qparams, then dequantized
Int8Embedding  rows stored as int8 with one symmetric scale per row; a lookup dequantizes only the rows used.

For dynamic/static the weight lives only in the kernel's packed form (no second
copy); `lowbit_extra_tensors` reports its int8 storage to measure.weight_bytes and
the state dict holds `weight_int8` + `weight_scale`, so safetensors files stay plain int8.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.affine import INT8, quantize_tensor

MODES = ("weight_only", "dynamic", "static")

# torch 2.13 warns that quantized tensors will be removed in a future release; lowbit pins
# torch 2.13, where the x86 int8 kernels behind them work. The warning is not actionable here.
warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated")


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (int8 [rows, cols], fp32 scale [rows])."""
    q, scale, _ = quantize_tensor(weight.detach().float(), INT8, symmetric=True, axis=0)
    return q, scale.reshape(-1)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, mode: str, bias: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if mode == "static":
            for name in ("input_scale", "output_scale"):
                self.register_buffer(name, torch.ones(()))
            for name in ("input_zero_point", "output_zero_point"):
                self.register_buffer(name, torch.zeros((), dtype=torch.int32))
        if mode == "weight_only":
            self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            self._packed = None
            self.register_state_dict_post_hook(Int8Linear._add_packed_weight)
            self.register_load_state_dict_pre_hook(Int8Linear._pack_loaded_weight)

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str, input_qparams=None, output_qparams=None) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, mode, bias=linear.bias is not None)
        q, scale = per_channel_int8(linear.weight)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        if mode == "static":
            module.input_scale.fill_(float(input_qparams[0]))
            module.input_zero_point.fill_(int(input_qparams[1]))
            module.output_scale.fill_(float(output_qparams[0]))
            module.output_zero_point.fill_(int(output_qparams[1]))
        module.set_int8_weight(q, scale)
        return module

    def set_int8_weight(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight_scale.copy_(scale)
        if self.mode == "weight_only":
            self.weight_int8.copy_(q)
            return
        qweight = torch._make_per_channel_quantized_tensor(
            q.contiguous(), scale.double(), torch.zeros_like(scale, dtype=torch.long), 0
        )
        self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)

    def int8_weight(self) -> torch.Tensor:
        if self.mode == "weight_only":
            return self.weight_int8
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def lowbit_extra_tensors(self):
        return [] if self.mode == "weight_only" else [torch.ops.quantized.linear_unpack(self._packed)[0]]

    def quantized_weight_stats(self) -> tuple[int, int]:
        """(int8 weights, their bytes with the per-channel scales): read by measure.quantized_weight_stats."""
        count = self.int8_weight().numel()  # dynamic/static: unpacked from the kernel's form, so once
        return count, count + _tensor_bytes(self.weight_scale)

    @staticmethod
    def _add_packed_weight(module, state_dict, prefix, local_metadata):
        state_dict[prefix + "weight_int8"] = module.int8_weight()

    @staticmethod
    def _pack_loaded_weight(module, state_dict, prefix, *args):
        if module.bias is not None:  # the packed kernel holds the bias: load it before packing
            module.bias.copy_(state_dict[prefix + "bias"])
        q = state_dict.pop(prefix + "weight_int8")
        module.set_int8_weight(q, state_dict[prefix + "weight_scale"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "weight_only":
            return F.linear(x, self.weight_int8.to(x.dtype) * self.weight_scale[:, None].to(x.dtype), self.bias)
        x = x.float().contiguous()
        if self.mode == "dynamic":
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        qx = torch.quantize_per_tensor(x, float(self.input_scale), int(self.input_zero_point), torch.quint8)
        qy = torch.ops.quantized.linear(qx, self._packed, float(self.output_scale), int(self.output_zero_point))
        return qy.dequantize()

    def logical_params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}"


class Int8Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Int8Embedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        q, scale = per_channel_int8(embedding.weight)
        module.weight_int8.copy_(q)
        module.weight_scale.copy_(scale)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * self.weight_scale[ids].unsqueeze(-1)

    def quantized_weight_stats(self) -> tuple[int, int]:
        return self.weight_int8.numel(), self.weight_int8.numel() + _tensor_bytes(self.weight_scale)

    def logical_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"
