"""Variants: the names lowbit reports under, and the card each saved variant carries.

A stage that produces a variant writes its model directory with a card,
`lowbit_variant.json` = {"variant": name, "format": storage format, "stage": producer, ...}.
The evaluate stage finds the cards and loads each model through its format's loader
(lowbit.formats, the one registry of loaders).
"""

from __future__ import annotations

from pathlib import Path

from lowbit.io import write_json

CARD = "lowbit_variant.json"
BASELINE = "fp32"
ZERO_SHOT = "zero_shot"  # causal_lm: the pretrained chat model as it is (format "pretrained": loaded from model.name)


def write_card(model_dir: Path, variant: str, fmt: str, stage: str, **info) -> None:
    write_json(model_dir / CARD, {"variant": variant, "format": fmt, "stage": stage, **info})
