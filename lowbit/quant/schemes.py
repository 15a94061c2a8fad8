"""PTQ schemes: one builder per scheme, registered in SCHEMES; one loader per storage format.

A builder takes the FP32 baseline directory and writes one or more variant
directories (models/ptq/<variant>/), each with its card. Adding a scheme is one
function here and its name in params.yaml `ptq.schemes`.

Storage formats:
  hf    transformers safetensors in a 16-bit dtype (half_bf16, half_fp16)
  int8  lowbit int8: config + safetensors holding int8 weights and fp32 scales
  bnb   bitsandbytes-quantized transformers checkpoint (NF4 packed 4-bit, LLM.int8)
  pt2e  a torch.export program with int8 weights (model.pt2), run through torch.compile
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

from lowbit.config import ModelParams
from lowbit.hardware import detect, device_map
from lowbit.models import load_classifier, load_tokenizer, save_model
from lowbit.quant.bnb import llm_int8_config, nf4_config, require_bitsandbytes, set_4bit_layouts
from lowbit.quant.compiled import PROGRAM_FILE, load_program, quantize_pt2e
from lowbit.quant.ptq import calibrate, linear_names, quantizable_layers, quantize_int8, restore_int8_modules
from lowbit.variants import register_loader, write_card

EMBEDDINGS_FP32_NOTE = "embeddings kept in FP32 (bitsandbytes quantizes nn.Linear layers only)"


@dataclass
class SchemeContext:
    baseline_dir: Path
    out_root: Path                  # models/ptq
    model: ModelParams
    skip_modules: list[str]
    quantize_embeddings: bool
    observers: list[str]
    percentile: float
    calib_batches: Callable[[], list]  # tokenized calibration batches (built once, on demand)


def load_baseline(ctx: SchemeContext, **kwargs):
    return load_classifier(str(ctx.baseline_dir), ctx.model, **kwargs), load_tokenizer(str(ctx.baseline_dir), ctx.model)


def save_int8(model, tokenizer, out: Path, variant: str, layout: dict[str, str], notes: list[str], stage: str = "ptq", **info) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors")
    write_card(out, variant, "int8", stage, layout=layout, notes=notes, **info)


@register_loader("int8")
def load_int8(path: Path, card: dict, model: ModelParams):
    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    net = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model.trust_remote_code)
    restore_int8_modules(net, card["layout"])
    net.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    return net.eval(), load_tokenizer(str(path), model)


@register_loader("bnb")
def load_bnb(path: Path, card: dict, model: ModelParams):
    require_bitsandbytes()
    net = load_classifier(str(path), model, device_map=device_map(detect()))
    set_4bit_layouts(net, training=False)
    return net, load_tokenizer(str(path), model)


@register_loader("pt2e")
def load_pt2e(path: Path, card: dict, model: ModelParams):
    return load_program(path), load_tokenizer(str(path), model)


def half(dtype: torch.dtype, variant: str):
    def build(ctx: SchemeContext) -> list[str]:
        model, tokenizer = load_baseline(ctx)
        out = ctx.out_root / variant
        save_model(model.to(dtype), tokenizer, out)
        write_card(out, variant, "hf", "ptq", dtype=str(dtype).removeprefix("torch."),
                   notes=[f"whole model cast to {dtype}, embeddings included"])
        return [variant]
    return build


def int8(mode: str, variant: str):
    def build(ctx: SchemeContext) -> list[str]:
        model, tokenizer = load_baseline(ctx)
        layers = quantizable_layers(model, ctx.skip_modules, ctx.quantize_embeddings)
        layout = quantize_int8(model, mode, layers)
        save_int8(model, tokenizer, ctx.out_root / variant, variant, layout, embedding_note(ctx) + skip_note(ctx))
        return [variant]
    return build


def int8_static(ctx: SchemeContext) -> list[str]:
    made = []
    for observer in ctx.observers:
        variant = f"ptq_int8_static_{observer}"
        model, tokenizer = load_baseline(ctx)
        layers = quantizable_layers(model, ctx.skip_modules, ctx.quantize_embeddings)
        ranges = calibrate(model, ctx.calib_batches(), linear_names(layers), observer, ctx.percentile)
        layout = quantize_int8(model, "static", layers, ranges)
        save_int8(model, tokenizer, ctx.out_root / variant, variant, layout,
                  embedding_note(ctx) + skip_note(ctx) + [f"activation ranges: {observer} observer over the calib split"])
        made.append(variant)
    return made


def int8_static_compiled(ctx: SchemeContext) -> list[str]:
    variant = "ptq_int8_static_compiled"
    model, tokenizer = load_baseline(ctx)
    program = quantize_pt2e(model, ctx.calib_batches(), ctx.skip_modules, ctx.quantize_embeddings)
    out = ctx.out_root / variant
    out.mkdir(parents=True)
    torch.export.save(program, str(out / PROGRAM_FILE))
    tokenizer.save_pretrained(out)
    write_card(out, variant, "pt2e", "ptq", notes=embedding_note(ctx) + skip_note(ctx) + [
        "W8A8 graph from torchao PT2E (X86InductorQuantizer; activation ranges: its histogram observer over the "
        "calib split), compiled by torch.compile with Inductor freezing; compile_seconds is the first calls' cost",
    ])
    return [variant]


def embedding_note(ctx: SchemeContext) -> list[str]:
    return [] if ctx.quantize_embeddings else ["embeddings kept in FP32 (ptq.quantize_embeddings: false)"]


def skip_note(ctx: SchemeContext) -> list[str]:
    return [f"kept in FP32 (ptq.skip_modules): {', '.join(ctx.skip_modules)}"] if ctx.skip_modules else []


def bnb(variant: str, config: Callable[[list[str]], BitsAndBytesConfig], what: str):
    def build(ctx: SchemeContext) -> list[str]:
        require_bitsandbytes()
        model, tokenizer = load_baseline(ctx, quantization_config=config(ctx.skip_modules), device_map="cpu")
        out = ctx.out_root / variant
        save_model(model, tokenizer, out)
        write_card(out, variant, "bnb", "ptq", device="cpu", notes=[what, EMBEDDINGS_FP32_NOTE] + skip_note(ctx))
        return [variant]
    return build


SCHEMES: dict[str, Callable[[SchemeContext], list[str]]] = {
    "half_bf16": half(torch.bfloat16, "half_bf16"),
    "half_fp16": half(torch.float16, "half_fp16"),
    "int8_weight_only": int8("weight_only", "ptq_int8_weight_only"),
    "int8_dynamic": int8("dynamic", "ptq_int8_dynamic"),
    "int8_static": int8_static,
    "int8_static_compiled": int8_static_compiled,
    "nf4": bnb("ptq_nf4", lambda skip: nf4_config(skip, torch.bfloat16), "NF4 4-bit weights, double-quantized block scales, bf16 compute"),
    "int8_bnb": bnb("ptq_int8_bnb", llm_int8_config, "LLM.int8 weights (bitsandbytes), fp16 matmul with outliers"),
}
