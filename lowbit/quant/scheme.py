"""What a PTQ scheme is: a builder from the FP32 baseline to saved variants, with its report order.

    SCHEMES = (Scheme("int8_dynamic", build_dynamic, variants=("ptq_int8_dynamic",), order=40),)

A scheme module in lowbit/quant/schemes/ defines `SCHEMES` (one or more) and `FORMATS`
({storage format: loader}) for what it writes; lowbit/quant/schemes/__init__.py collects them.
A builder gets a SchemeContext and returns the names of the variants it saved under
`ctx.out_root/<variant>/`, each directory with its card (lowbit.variants.write_card).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams



@dataclass
class SchemeContext:
    baseline_dir: Path
    out_root: Path                  # models/ptq
    model: ModelParams
    skip_modules: list[str]
    quantize_embeddings: bool
    observers: list[str]
    percentile: float
    int4_group_size: int
    calib_batches: Callable[[], list]  # tokenized calibration batches (built once, on demand)


@dataclass(frozen=True)
class Scheme:
    name: str                                   # the entry in params.yaml ptq.schemes
    build: Callable[[SchemeContext], list[str]]
    variants: tuple[str, ...]                   # the variant names (or glob patterns) it writes, in report order
    order: int                                  # where its variants sit among all schemes' in the report


def embedding_note(ctx: SchemeContext) -> list[str]:
    return [] if ctx.quantize_embeddings else ["embeddings kept in FP32 (ptq.quantize_embeddings: false)"]


def skip_note(ctx: SchemeContext) -> list[str]:
    return [f"kept in FP32 (ptq.skip_modules): {', '.join(ctx.skip_modules)}"] if ctx.skip_modules else []
