"""int8_static_compiled: a W8A8 torch.export program (torchao PT2E, X86 Inductor quantizer), run by torch.compile.

Storage format `pt2e`: model.pt2 (int8 weights and scales, stored once) and the tokenizer.
The machinery is in lowbit/quant/compiled.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path

import torch

from lowbit.models import load_tokenizer
from lowbit.task_types import load_saved
from lowbit.quant.compiled import PROGRAM_FILE, load_program, quantize_pt2e
from lowbit.quant.scheme import Scheme, SchemeContext, embedding_note, skip_note
from lowbit.variants import write_card

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams

VARIANT = "ptq_int8_static_compiled"


def build(ctx: SchemeContext) -> list[str]:
    model, tokenizer = load_saved(ctx.baseline_dir, ctx.model)
    program = quantize_pt2e(model, ctx.calib_batches(), ctx.skip_modules, ctx.quantize_embeddings)
    out = ctx.out_root / VARIANT
    out.mkdir(parents=True)
    torch.export.save(program, str(out / PROGRAM_FILE))
    tokenizer.save_pretrained(out)
    write_card(out, VARIANT, "pt2e", "ptq", notes=embedding_note(ctx) + skip_note(ctx) + [
        "W8A8 graph from torchao PT2E (X86InductorQuantizer; activation ranges: its histogram observer over the "
        "calib split), compiled by torch.compile with Inductor freezing; compile_seconds is its first call's cost",
    ])
    return [VARIANT]


def load_pt2e(path: Path, card: dict, model: ModelParams):
    return load_program(path), load_tokenizer(str(path), model)


# Ordered after the eager static variants: "ptq_int8_static_*" would also match its name.
SCHEMES = (Scheme("int8_static_compiled", build, variants=(VARIANT,), order=45),)
FORMATS = {"pt2e": load_pt2e}
