"""Variants: names, report order, and how each saved variant is loaded back.

A stage that produces a variant writes its model directory with a card,
`lowbit_variant.json` = {"variant": name, "format": loader name, ...}. The evaluate
stage discovers the cards and loads each model through the loader registered for
its format, so a new scheme is one loader registered here plus the stage producing it.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from lowbit.config import ModelParams
from lowbit.errors import LowbitError
from lowbit.io import read_json, write_json
from lowbit.models import load_classifier, load_tokenizer

CARD = "lowbit_variant.json"
BASELINE = "fp32"

# Report order; patterns match families (ptq_int8_static_<observer>).
VARIANT_ORDER = [
    "fp32", "half_bf16", "half_fp16", "ptq_int8_weight_only", "ptq_int8_dynamic", "ptq_int8_static_*",
    "ptq_nf4", "ptq_int8_bnb", "qat_int8", "lora", "lora_merged", "qlora", "qlora_merged",
]

Loader = Callable[[Path, dict, ModelParams], tuple[torch.nn.Module, PreTrainedTokenizerBase]]
LOADERS: dict[str, Loader] = {}


def register_loader(fmt: str) -> Callable[[Loader], Loader]:
    def add(fn: Loader) -> Loader:
        LOADERS[fmt] = fn
        return fn

    return add


@register_loader("hf")
def load_hf_classifier(path: Path, card: dict, model: ModelParams):
    """A plain transformers classifier directory (safetensors), in the dtype it was saved in."""
    dtype = getattr(torch, card.get("dtype", "float32"))
    return load_classifier(str(path), model, dtype=dtype), load_tokenizer(str(path), model)


def write_card(model_dir: Path, variant: str, fmt: str, stage: str, **info) -> None:
    if fmt not in LOADERS:
        raise ValueError(f"no loader registered for format {fmt!r}")
    write_json(model_dir / CARD, {"variant": variant, "format": fmt, "stage": stage, **info})


def discover(models_dir: Path) -> dict[str, Path]:
    """variant name -> model directory, for every card under models/ (sorted in report order)."""
    found: dict[str, Path] = {}
    for card in sorted(models_dir.rglob(CARD)):
        name = read_json(card)["variant"]
        if name in found:
            raise LowbitError(f"variant {name!r} is produced twice: {found[name]} and {card.parent}")
        found[name] = card.parent
    return dict(sorted(found.items(), key=lambda item: order_key(item[0])))


def order_key(variant: str) -> tuple[int, str]:
    for rank, pattern in enumerate(VARIANT_ORDER):
        if fnmatch.fnmatchcase(variant, pattern):
            return rank, variant
    return len(VARIANT_ORDER), variant


def load_variant(model_dir: Path, model: ModelParams):
    card = read_json(model_dir / CARD)
    loader = LOADERS.get(card["format"])
    if loader is None:
        raise LowbitError(f"{model_dir / CARD}: unknown format {card['format']!r}; known: {', '.join(LOADERS)}")
    return loader(model_dir, card, model)
