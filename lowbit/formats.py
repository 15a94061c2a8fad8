"""Storage formats: how each saved variant is loaded back, and the order variants are reported in.

    model, tokenizer = load_variant(Path("models/ptq/ptq_int8_dynamic"), params.model)
    variants = discover(Path("models"))     # {variant: directory}, in report order

The one registry of loaders: `hf` (plain transformers safetensors) and `peft` (adapters on
their base) here, every other format from the scheme that writes it (lowbit.quant.schemes).
A saved variant's card names its format (lowbit.variants.write_card).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from lowbit.adapters import load_adapter_model
from lowbit.config import ModelParams
from lowbit.errors import LowbitError
from lowbit.io import read_json
from lowbit.models import load_tokenizer, resolve_model
from lowbit.quant.schemes import FORMATS as SCHEME_FORMATS
from lowbit.quant.schemes import SCHEMES
from lowbit.task_types import load_saved, task_type
from lowbit.variants import BASELINE, CARD, ZERO_SHOT

Loader = Callable[[Path, dict, ModelParams], tuple[torch.nn.Module, PreTrainedTokenizerBase]]


def load_hf(path: Path, card: dict, model: ModelParams):
    """A plain transformers model directory (safetensors), in the dtype it was saved in."""
    return load_saved(path, model, dtype=getattr(torch, card.get("dtype", "float32")))


def load_pretrained(path: Path, card: dict, model: ModelParams):
    """The model the card names (`base_model`), as published: a zero-shot row, no weights of its own."""
    source = resolve_model(card["base_model"])
    return task_type(model).load_pretrained(source, model), load_tokenizer(source, model)


LOADERS: dict[str, Loader] = {"hf": load_hf, "peft": load_adapter_model, "pretrained": load_pretrained, **SCHEME_FORMATS}

# Report order: the baseline, every scheme's variants in scheme order, then the training stages'.
VARIANT_ORDER = [BASELINE, ZERO_SHOT, *(v for scheme in SCHEMES.values() for v in scheme.variants),
                 "qat_int8", "lora", "lora_merged", "qlora", "qlora_merged"]


def load_variant(model_dir: Path, model: ModelParams):
    card = read_json(model_dir / CARD)
    loader = LOADERS.get(card["format"])
    if loader is None:
        raise LowbitError(f"{model_dir / CARD}: unknown format {card['format']!r}; known: {', '.join(LOADERS)}")
    return loader(model_dir, card, model)


def order_key(variant: str) -> tuple[int, str]:
    for rank, pattern in enumerate(VARIANT_ORDER):
        if fnmatch.fnmatchcase(variant, pattern):
            return rank, variant
    return len(VARIANT_ORDER), variant


def discover(models_dir: Path) -> dict[str, Path]:
    """variant name -> model directory, for every card under models/ (sorted in report order).

    Hidden folders are skipped: a stage killed outright (out of memory, SIGKILL) can leave its
    temporary `.ptq.tmp-*` output behind, and it is not a variant."""
    found: dict[str, Path] = {}
    for card in sorted(models_dir.rglob(CARD)):
        if any(part.startswith(".") for part in card.relative_to(models_dir).parts):
            continue
        name = read_json(card)["variant"]
        if name in found:
            raise LowbitError(f"variant {name!r} is produced twice: {found[name]} and {card.parent}")
        found[name] = card.parent
    return dict(sorted(found.items(), key=lambda item: order_key(item[0])))
