"""`lowbit gguf VARIANT`: a causal LM variant as GGUF files, each reloaded and scored against the model it came from.

    lowbit gguf lora_merged --qtype Q8_0 Q4_1
    -> exports/lora_merged-Q8_0.gguf: test loss 0.4120 vs 0.4118 in memory (gap +0.0002) ...

What exports: a variant saved as a plain HF folder (fp32, the merged adapters); an adapter variant
exports its merged copy (`lora` -> `lora_merged`). A variant held in lowbit's or bitsandbytes' quantized
formats has no float weights to write: export the fp32 or merged model in a GGUF type instead. The loss
gap is measured, teacher-forced on the test split (target tokens only), after reloading the file through
transformers' gguf_file loading: what a llama.cpp user gets, against what lowbit evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lowbit.config import Params
from lowbit.errors import LowbitError
from lowbit.formats import discover
from lowbit.gguf import export_gguf, reload_gguf
from lowbit.io import read_json
from lowbit.task_types import load_saved
from lowbit.task_types.causal_lm import make_loader, validation_figures
from lowbit.variants import CARD
from tasks.plumbing import Paths

EXPORTS = "exports"


def exportable(paths: Paths, variant: str) -> tuple[str, Path]:
    """(the variant that exports, its folder): an adapter variant's merged copy stands in for it."""
    variants = discover(paths.models)
    if variant in variants and read_json(variants[variant] / CARD)["format"] == "peft":
        variant = f"{variant}_merged"
    if variant not in variants:
        raise LowbitError(f"no variant {variant!r} under {paths.models}; variants: {', '.join(variants)} (run `lowbit run`)")
    fmt = read_json(variants[variant] / CARD)["format"]
    if fmt != "hf":
        plain = [v for v, d in variants.items() if read_json(d / CARD)["format"] == "hf"]
        raise LowbitError(f"variant {variant!r} is stored as {fmt!r}, not float weights GGUF can take; export one of "
                          f"{', '.join(plain)} with --qtype Q8_0 or Q4_1 instead")
    return variant, variants[variant]


def export_variant(params: Params, paths: Paths, variant: str, qtypes: list[str]) -> list[dict]:
    if params.model.task != "causal_lm":
        raise LowbitError(f"GGUF export is for causal LMs (llama.cpp); params.yaml model.task is {params.model.task}")
    variant, model_dir = exportable(paths, variant)
    loader_of = lambda tokenizer: make_loader(tokenizer, pd.read_parquet(paths.prepared / "test.parquet"),  # noqa: E731
                                              params.evaluate.batch_size, params.model.max_length)
    model, tokenizer = load_saved(model_dir, params.model)
    in_memory = validation_figures(model, loader_of(tokenizer))["loss"]
    rows = []
    for qtype in qtypes:
        out = export_gguf(model_dir, paths.root / EXPORTS / f"{variant}-{qtype}.gguf", qtype)
        reloaded, reloaded_tokenizer = reload_gguf(out)
        loss = validation_figures(reloaded, loader_of(reloaded_tokenizer))["loss"]
        rows.append({"variant": variant, "qtype": qtype, "file": str(out.relative_to(paths.root)), "bytes": out.stat().st_size,
                     "test_loss_in_memory": in_memory, "test_loss_gguf": loss, "loss_gap": loss - in_memory})
    (paths.root / EXPORTS / f"{variant}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows
