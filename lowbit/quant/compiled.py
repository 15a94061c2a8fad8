"""Static int8 for torch.compile: torchao's PT2E flow with the X86 Inductor quantizer.

    program = quantize_pt2e(model, calib_batches, skip=["classifier"], embeddings=True)
    torch.export.save(program, out / "model.pt2")                     # int8 weights + scales, nothing in FP32 twice
    model = CompiledClassifier(torch.export.load(out / "model.pt2"))  # runs through Inductor, freezing on

The eager int8 variants call fbgemm one linear at a time and pay for quantizing,
dequantizing and re-laying out activations between every pair of layers. Here the whole
forward pass is one exported graph; `convert_pt2e` folds the weights to int8 constants,
and Inductor (with freezing) fuses quantize/dequantize into oneDNN int8 linears and the
element-wise work around them, attention's scale, mask and softmax included (the model is
exported with eager attention for that; attention's two matmuls stay FP32). The price is
compilation on the first call (batch and sequence length are symbolic, one program serves
every shape, a batch of 1 included): `compile_seconds` measures it, and Inductor's on-disk
cache makes later runs cheaper.

Embeddings are quantized per row with lowbit's Int8Embedding before export (the
quantizer handles linear layers only); ptq.skip_modules stay in FP32.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.ptq import EMPTY_CALIBRATION, quantizable_layers, quantize_int8

PROGRAM_FILE = "model.pt2"


def _require_torchao():
    try:
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as err:
        raise LowbitError(
            f"int8_static_compiled needs torchao ({err}); run `make install`, or drop it from ptq.schemes"
        ) from None
    return quantize_pt2e, x86_inductor_quantizer


def export_classifier(model: nn.Module, example: dict[str, torch.Tensor], positions: int) -> torch.export.ExportedProgram:
    """Export with batch size and sequence length (up to the model's positions) left dynamic: one program for every batch."""
    batch, length = torch.export.Dim("batch", max=4096), torch.export.Dim("length", max=positions)
    dims = {name: {0: batch, 1: length} for name in example}
    return torch.export.export(model, (), example, dynamic_shapes=dims, strict=False)


def _drop_unused_parameters(graph: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the FP32 originals of folded int8 weights registered; drop them."""
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name, _ in list(graph.named_parameters()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, leaf)


@torch.no_grad()
def quantize_pt2e(
    model: nn.Module, batches: list[dict], skip_modules: list[str], quantize_embeddings: bool,
) -> torch.export.ExportedProgram:
    """W8A8 static program: int8 per-channel weights, per-tensor activations calibrated on `batches`."""
    pt2e, x86 = _require_torchao()
    batches = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    if not batches:
        raise LowbitError(EMPTY_CALIBRATION)
    model.eval()
    # Attention as plain matmul + softmax rather than one SDPA call: Inductor fuses the scale, mask and
    # softmax around two GEMMs, where it would call ATen's CPU flash-attention kernel as it is, which is
    # slow for classifier-length sequences. Measured on this 2-core AVX512-VNNI CPU: batch 64 x 64 tokens
    # 186 ms against 231 ms, batch 1 x 20 tokens 3.6 ms against 4.1 ms; attention stays in FP32 either way.
    model.set_attn_implementation("eager")
    layers = quantizable_layers(model, skip_modules, quantize_embeddings)
    # embeddings: lowbit's per-row int8 (the quantizer handles linears only); the mode is for linears
    quantize_int8(model, "weight_only", {n: m for n, m in layers.items() if isinstance(m, nn.Embedding)})
    # 7-bit activations, as everywhere in lowbit (affine.ACTIVATION): without VNNI, x86 int8 kernels
    # multiply u8×s8 pairs into saturating int16; with the full 8 bits the tiny test model's logits
    # moved by a quarter of their range on this AVX2 CPU
    config = x86.get_default_x86_inductor_quantization_config(reduce_range=True)
    quantizer = x86.X86InductorQuantizer().set_global(config)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name not in layers:
            quantizer.set_module_name_qconfig(name, None)
    positions = model.config.max_position_embeddings
    prepared = pt2e.prepare_pt2e(export_classifier(model, batches[0], positions).module(), quantizer)
    for batch in batches:
        prepared(**batch)
    converted = pt2e.convert_pt2e(prepared)
    _drop_unused_parameters(converted)
    return export_classifier(converted, batches[0], positions)


class CompiledClassifier(nn.Module):
    """An exported int8 program, compiled by Inductor on first call; called like the HF model."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.graph = program.module()
        self._compiled = torch.compile(self.graph, dynamic=True)
        self.compile_seconds = 0.0

    def forward(self, **inputs):
        graphs_before = _compiled_graphs()
        started = time.perf_counter()
        # freezing folds the int8 weights into prepacked oneDNN kernels (inference only); it must be
        # on while a call compiles: torch.compile(options=...) did not reach the weight-prepack pass.
        # One program for every shape: without the shape settings Dynamo compiled three (30 + 16 + 16 s
        # here), once more when batch and length happened to be equal (duck sizing made them one
        # symbol) and once more for a batch of 1 (sizes 0 and 1 are specialised unless size-oblivious).
        with torch.no_grad(), torch._inductor.config.patch(freezing=True), \
                torch.fx.experimental._config.patch(use_duck_shape=False, backed_size_oblivious=True):
            out = self._compiled(**inputs)
        if _compiled_graphs() != graphs_before:  # this call compiled (a new shape class): count its time
            self.compile_seconds += time.perf_counter() - started
        return out

    def train(self, mode: bool = True):
        if mode:
            raise LowbitError("a compiled int8 program is inference-only; train the FP32 model (or use qat)")
        self.training = False  # an exported graph has no train/eval modes (and refuses to be switched)
        return self

    def int8_weights(self) -> list[torch.Tensor]:
        return [t for t in self.graph.buffers() if t.dtype == torch.int8]

    def logical_params(self) -> int:
        """Weights stored as int8 count one each (FP32 parameters are counted by param_counts itself)."""
        return sum(t.numel() for t in self.int8_weights())

    def quantized_weight_stats(self) -> tuple[int, int]:
        """(int8 weights, their bytes with scales and zero points): everything the graph holds but FP32 parameters."""
        count = self.logical_params()
        held = sum(t.numel() * t.element_size() for t in self.graph.buffers())
        return count, held


def _compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def load_program(path: Path) -> CompiledClassifier:
    return CompiledClassifier(torch.export.load(str(path / PROGRAM_FILE)))
