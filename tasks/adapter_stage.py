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
    accuracy_on, dequantized_4bit_weights, lora_model, merged_model, optimizer_choice, requantize,
)
from lowbit.config import LoraParams, Params, QLoraParams
from lowbit.errors import LowbitError
from lowbit.formats import load_variant
from lowbit.hardware import detect, device_map, qlora_compute_dtype
from lowbit.io import atomic_dir, read_json, write_json
from lowbit.measure import cuda_peak_bytes
from lowbit.models import load_classifier, load_tokenizer, param_counts, resolve_model
from lowbit.train import determinism, make_loader, train
from lowbit.variants import write_card
from tasks.plumbing import RESULT_FILE, Paths, StageClock


def run_adapter_stage(section: str, cfg: LoraParams, params: Params, paths: Paths, build_base: Callable) -> dict:
    clock = StageClock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    quantized = isinstance(cfg, QLoraParams)
    labels = read_json(paths.prepared / "meta.json")["labels"]
    source = resolve_model(params.model.name)
    tokenizer = load_tokenizer(source, params.model)
    # seeded here: the head and the adapters' A matrices are drawn next, from the seed, not the process
    with determinism(params.determinism, cfg.seed, detect()) as applied:
        model = lora_model(build_base(source, labels), cfg, section)
        optimizer, why, factory = optimizer_choice(cfg) if quantized else ("AdamW", "full-precision adapters", None)
        print(f"{section}: optimizer {optimizer} ({why})", flush=True)
        val = pd.read_parquet(paths.prepared / "val.parquet")
        fit = train(model, tokenizer, pd.read_parquet(paths.prepared / "train.parquet"), val, cfg,
                    params.model.max_length, optimizer_factory=factory)
    trainable, total = param_counts(model)
    result = {
        "variant": section, **fit.figures(),
        "trainable_params": trainable, "total_params": total, "trainable_share": trainable / total,
        "cuda_peak_bytes": cuda_peak_bytes(), "optimizer": optimizer, "optimizer_reason": why, **applied,
    }
    card = {"base_model": params.model.name, "labels": labels, "training": result}
    if quantized:
        dtype, reason = qlora_compute_dtype(cfg.compute_dtype, detect())
        result |= {"compute_dtype": str(dtype).removeprefix("torch."), "compute_dtype_reason": reason}
        card |= {"base_quantization": "nf4", "compute_dtype": result["compute_dtype"],
                 "device": device_map(detect())}
    val_loader = make_loader(tokenizer, val, params.evaluate.batch_size, params.model.max_length)
    with atomic_dir(paths.models / section) as out:
        model.save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        write_card(out / "adapter", section, "peft", section, **card)
        base_weights = dequantized_4bit_weights(model) if quantized else None
        merged = merged_model(out / "adapter", load_classifier(source, params.model, labels), base_weights)
        how = cfg.requantize_merged if quantized else "none"
        requantize(merged, tokenizer, out / "merged", f"{section}_merged", section, how, params.model, {"training": result})
        result |= merge_check(model, out / "merged", params, val_loader, section)
        result["stage_seconds"] = clock.seconds()
        write_json(out / RESULT_FILE, result)
    return result


def merge_check(adapter_model, merged_dir: Path, params: Params, val_loader, section: str) -> dict:
    """Validation accuracy of the adapter model vs the merged copy as reloaded from disk."""
    adapter_accuracy = accuracy_on(adapter_model, val_loader)
    merged, _ = load_variant(merged_dir, params.model)
    merged_accuracy = accuracy_on(merged, val_loader)
    drop = (adapter_accuracy - merged_accuracy) * 100.0
    if drop > params.export.max_merge_drop:
        raise LowbitError(
            f"{section}: merging cost {drop:.2f} validation accuracy points ({adapter_accuracy:.4f} -> {merged_accuracy:.4f}), "
            f"more than export.max_merge_drop={params.export.max_merge_drop:g}; serve the adapter model instead, "
            "or (QLoRA) set qlora.requantize_merged: none to keep the merged weights in fp32"
        )
    return {"merge_val_accuracy_adapter": adapter_accuracy, "merge_val_accuracy_merged": merged_accuracy,
            "merge_accuracy_drop": drop}
