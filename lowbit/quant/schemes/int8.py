"""int8 through lowbit's own modules (lowbit.quant.modules): weight-only, dynamic and static W8A8.

Saved in the `int8` storage format (lowbit.quant.storage), which qat and merged adapters share.
"""

from __future__ import annotations

from lowbit.task_types import load_saved
from lowbit.quant.storage import load_int8, save_int8
from lowbit.quant.ptq import calibrate, linear_names, quantizable_layers, quantize_int8
from lowbit.quant.scheme import Scheme, SchemeContext, embedding_note, skip_note


def quantized(mode: str, variant: str):
    def build(ctx: SchemeContext) -> list[str]:
        model, tokenizer = load_saved(ctx.baseline_dir, ctx.model)
        layers = quantizable_layers(model, ctx.skip_modules, ctx.quantize_embeddings)
        layout = quantize_int8(model, mode, layers)
        save_int8(model, tokenizer, ctx.out_root / variant, variant, layout, embedding_note(ctx) + skip_note(ctx))
        return [variant]
    return build


def static_per_observer(ctx: SchemeContext) -> list[str]:
    """One W8A8 variant per calibration observer in ptq.observers."""
    made = []
    for observer in ctx.observers:
        variant = f"ptq_int8_static_{observer}"
        model, tokenizer = load_saved(ctx.baseline_dir, ctx.model)
        layers = quantizable_layers(model, ctx.skip_modules, ctx.quantize_embeddings)
        ranges = calibrate(model, ctx.calib_batches(), linear_names(layers), observer, ctx.percentile)
        layout = quantize_int8(model, "static", layers, ranges)
        save_int8(model, tokenizer, ctx.out_root / variant, variant, layout,
                  embedding_note(ctx) + skip_note(ctx) + [f"activation ranges: {observer} observer over the calib split"])
        made.append(variant)
    return made


SCHEMES = (
    Scheme("int8_weight_only", quantized("weight_only", "ptq_int8_weight_only"), variants=("ptq_int8_weight_only",), order=30),
    Scheme("int8_dynamic", quantized("dynamic", "ptq_int8_dynamic"), variants=("ptq_int8_dynamic",), order=40),
    Scheme("int8_static", static_per_observer, variants=("ptq_int8_static_*",), order=50),
)
FORMATS = {"int8": load_int8}
