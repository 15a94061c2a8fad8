"""The LoRA / QLoRA stage body: same recipe, different base builder (as torchtune composes QLoRA).

train adapters → save adapter (+card) → merge into fp32 (QLoRA: into the dequantized
NF4 weights) → optionally re-quantize → reload the merged copy from disk and check it
loses at most `export.max_merge_drop` validation points against the adapter model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from lowbit.adapters import (
    dequantized_4bit_weights, lora_model, merged_model, optimizer_choice, requantize,
)
from lowbit.config import LoraParams, Params, QLoraParams
from lowbit.errors import LowbitError
from lowbit.formats import load_variant
from lowbit.hardware import detect, device_map, qlora_compute_dtype
from lowbit.io import atomic_dir, read_json, write_json
from lowbit.measure import cuda_peak_bytes
from lowbit.models import load_tokenizer, param_counts, resolve_model
from lowbit.task_types import task_type
from lowbit.train import determinism, train
from lowbit.variants import write_card
from tasks.plumbing import RESULT_FILE, Paths, StageClock


def run_adapter_stage(section: str, cfg: LoraParams, params: Params, paths: Paths, build_base: Callable) -> dict:
    clock = StageClock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    quantized = isinstance(cfg, QLoraParams)
    kind = task_type(params.model)
    meta = read_json(paths.prepared / "meta.json")
    source = resolve_model(params.model.name)
    tokenizer = load_tokenizer(source, params.model)
    val = pd.read_parquet(paths.prepared / "val.parquet")
    val_loader = kind.make_loader(tokenizer, val, params.evaluate.batch_size, params.model.max_length)
    # seeded here: the head and the adapters' A matrices are drawn next, from the seed, not the process
    with determinism(params.determinism, cfg.seed, detect()) as applied:
        base = build_base(source, meta)
        # the frozen base as it is trained against (QLoRA: its NF4 copy), before any adapter: what the
        # adapters add is judged against this, and QLoRA against LoRA on equal terms
        before = {f"base_val_{k}": v for k, v in kind.validation_figures(base, val_loader).items()}
        model = lora_model(base, cfg, section, params.model.task)
        optimizer, why, factory = optimizer_choice(cfg) if quantized else ("AdamW", "full-precision adapters", None)
        print(f"{section}: optimizer {optimizer} ({why})", flush=True)
        fit = train(model, tokenizer, pd.read_parquet(paths.prepared / "train.parquet"), val, cfg,
                    params.model.max_length, optimizer_factory=factory, task=params.model.task)
    trainable, total = param_counts(model)
    result = {
        "variant": section, **fit.figures(),
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "cuda_peak_bytes": cuda_peak_bytes(), "optimizer": optimizer, "optimizer_reason": why, **before, **applied,
    }
    figures = ", ".join(f"{k.removeprefix('base_val_')} {v:.4f}" for k, v in before.items())
    frozen = "its NF4 copy" if quantized else "fp32"
    card = {"base_model": params.model.name, "labels": meta["labels"], "training": result,
            "notes": [f"frozen base ({frozen}) before training, validation split: {figures}"]}
    if quantized:
        dtype, reason = qlora_compute_dtype(cfg.compute_dtype, detect())
        result |= {"compute_dtype": str(dtype).removeprefix("torch."), "compute_dtype_reason": reason}
        card |= {"base_quantization": "nf4", "compute_dtype": result["compute_dtype"],
                 "device": device_map(detect())}
    with atomic_dir(paths.models / section) as out:
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        write_card(out / "adapter", section, "peft", section, **card)
        base_weights = dequantized_4bit_weights(model) if quantized else None
        merged = merged_model(out / "adapter", kind.load_pretrained(source, params.model, meta), base_weights)
        how = cfg.requantize_merged if quantized else "none"
        requantize(merged, tokenizer, out / "merged", f"{section}_merged", section, how, params.model, {"training": result})
        result |= merge_check(model, out / "merged", params, val_loader, section)
        result["stage_seconds"] = clock.seconds()
        write_json(out / RESULT_FILE, result)
    return result


def merge_check(adapter_model, merged_dir: Path, params: Params, val_loader, section: str) -> dict:
    """Validation score of the adapter model vs the merged copy as reloaded from disk (accuracy for a
    classifier, target-token accuracy for a causal LM: lowbit.task_types)."""
    score = task_type(params.model).validation_score
    adapter_accuracy = score(adapter_model, val_loader)
    merged, _ = load_variant(merged_dir, params.model)
    merged_accuracy = score(merged, val_loader)
    drop = (adapter_accuracy - merged_accuracy) * 100.0
    if drop > params.export.max_merge_drop:
        raise LowbitError(
            f"{section}: merging cost {drop:.2f} validation accuracy points ({adapter_accuracy:.4f} -> {merged_accuracy:.4f}), "
            f"more than export.max_merge_drop={params.export.max_merge_drop:g}; serve the adapter model instead, "
            "or (QLoRA) set qlora.requantize_merged: none to keep the merged weights in fp32"
        )
    return {"merge_val_accuracy_adapter": adapter_accuracy, "merge_val_accuracy_merged": merged_accuracy,
            "merge_accuracy_drop": drop}
