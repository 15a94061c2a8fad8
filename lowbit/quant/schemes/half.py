"""16-bit: the whole FP32 baseline cast to bfloat16 or float16 (stored in the plain `hf` format)."""

from __future__ import annotations

import torch

from lowbit.models import save_model
from lowbit.task_types import load_saved
from lowbit.quant.scheme import Scheme, SchemeContext
from lowbit.variants import write_card


def cast_to(dtype: torch.dtype, variant: str):
    def build(ctx: SchemeContext) -> list[str]:
        model, tokenizer = load_saved(ctx.baseline_dir, ctx.model)
        out = ctx.out_root / variant
        save_model(model.to(dtype), tokenizer, out)
        write_card(out, variant, "hf", "ptq", dtype=str(dtype).removeprefix("torch."),
                   notes=[f"whole model cast to {dtype}, embeddings included"])
        return [variant]
    return build


SCHEMES = (
    Scheme("half_bf16", cast_to(torch.bfloat16, "half_bf16"), variants=("half_bf16",), order=10),
    Scheme("half_fp16", cast_to(torch.float16, "half_fp16"), variants=("half_fp16",), order=20),
)
FORMATS = {}  # written in the `hf` format, which lowbit.formats loads
