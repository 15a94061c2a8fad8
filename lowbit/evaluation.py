"""The evaluation harness: one function, every variant, the same test split.

    metrics = evaluate_model(model, tokenizer, test_frame, params.evaluate, max_length=64)

Quality (`accuracy`, `f1_macro`, `ece`, `loss`) comes from lowbit's own `evaluate`
metric modules. Speed: `throughput_samples_s` over the pre-tokenized test set at the
evaluation batch size; `latency_ms_p50/p95` over single examples (batch of 1).
Tokenization is outside every timed region: the figures are the model's.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from lowbit.config import EvaluateParams, ModelParams
from lowbit.io import read_json
from lowbit.measure import (
    bits_per_param, disk_bytes, latency_summary, peak_rss_bytes, quantized_weight_stats, reset_peak_rss, time_calls,
    weight_bytes,
)
from lowbit.models import param_counts
from lowbit.formats import load_variant
from lowbit.variants import CARD
from lowbit.metrics import quality_metrics
from lowbit.train import make_loader


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def evaluate_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test_frame: pd.DataFrame,
    params: EvaluateParams, max_length: int,
) -> dict[str, float]:
    model.eval()
    device = model_device(model)
    batches = [
        {k: v.to(device) for k, v in batch.items()}
        for batch in make_loader(tokenizer, test_frame, params.batch_size, max_length)
    ]
    labels = np.concatenate([batch.pop("labels").cpu().numpy() for batch in batches])
    forward = lambda batch: model(**batch).logits  # noqa: E731
    for _ in range(params.warmup_batches):
        forward(batches[0])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    logits = np.concatenate([forward(batch).float().cpu().numpy() for batch in batches])
    sync()
    elapsed = time.perf_counter() - begin
    metrics = quality_metrics(logits, labels)
    metrics["throughput_samples_s"] = len(labels) / elapsed
    metrics |= single_example_latency(model, tokenizer, test_frame, params, max_length, device, sync)
    metrics["n_test"] = int(len(labels))
    return metrics


def single_example_latency(model, tokenizer, test_frame, params, max_length, device, sync) -> dict[str, float]:
    texts = test_frame["text"].tolist()
    samples = [texts[i % len(texts)] for i in range(params.latency_samples)]
    encoded = [
        {k: v.to(device) for k, v in tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt").items()}
        for t in samples
    ]
    position = iter(range(10**9))

    def one_call():
        model(**encoded[next(position) % len(encoded)])
        sync()

    return latency_summary(time_calls(one_call, repeats=len(encoded), warmup=params.warmup_batches))


def evaluate_saved_variant(
    variant: str, model_dir: Path, test_frame: pd.DataFrame, params: EvaluateParams, model_params: ModelParams
) -> dict:
    """Load one saved variant and measure it: quality, memory, speed, time for this variant."""
    gc.collect()
    reset_peak_rss()
    started = time.perf_counter()
    model, tokenizer = load_variant(model_dir, model_params)
    _, total = param_counts(model)
    held = weight_bytes(model)
    quantized_params, quantized_bytes = quantized_weight_stats(model)
    metrics = evaluate_model(model, tokenizer, test_frame, params, model_params.max_length)
    card = read_json(model_dir / CARD)
    metrics |= {
        "weight_bytes": held,
        "disk_bytes": disk_bytes(model_dir),
        "total_params": total,
        "bits_per_param": bits_per_param(held, total),
        "quantized_params": quantized_params,
        "quantized_bits_per_param": bits_per_param(quantized_bytes, quantized_params) if quantized_params else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "stage_seconds": time.perf_counter() - started,
    }
    if hasattr(model, "compile_seconds"):  # compiled programs: time spent compiling, inside the warm-up calls
        metrics["compile_seconds"] = model.compile_seconds
    return {"variant": variant, "format": card["format"], "stage": card["stage"], "model_dir": str(model_dir), "metrics": metrics,
            "producer": card.get("training", {}), "notes": card.get("notes", [])}
