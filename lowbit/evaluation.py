"""The evaluation harness: one function, every variant, the same test split.

    metrics, logits, labels = evaluate_model(model, tokenizer, test_frame, params.evaluate, max_length=64)
    record, calibrator, predictions = evaluate_saved_variant(variant, model_dir, test, val, params.evaluate,
                                                             params.model, label_names)

Quality (`accuracy`, `f1_macro`, `ece`, `loss`) comes from lowbit's own `evaluate`
metric modules, each with a 95% interval from a seeded bootstrap over test rows
(`accuracy_ci_low` / `accuracy_ci_high`, ...; lowbit.statistics). Probability calibration
(`evaluate.calibration`) is fitted on the validation split only and applied to the test
probabilities: `ece_calibrated`, `loss_calibrated` (accuracy is the uncalibrated argmax's;
temperature scaling never changes it). Per-class precision/recall/F1 and the confusion
matrix go into the record (`per_class`), the worst class's recall into `recall_min_class`.
Speed: `throughput_samples_s` over the test set at the evaluation batch size, summed over the forward
passes (each batch is tokenized just before its pass, so the encoded split is never held whole);
`latency_ms_p50/p95` over single examples (batch of 1): `latency_samples` test texts, each timed
`latency_rounds` times a round apart, each text's fastest pass counted (derived: a pass that another
process paused is the machine's cost, not the model's), p50/p95 over the texts. Tokenization is
outside every timed region: the figures are the model's.

Test and validation rows are batched in order of token count, as an offline batch job or a
serving batcher groups them, and every output is put back in row order: each batch is padded to
its longest row, and in split order the builtin test split was 72% padding over its real tokens
(21,176 computed for 12,339), a third of every variant's evaluation time spent on padding.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from lowbit.calibration import Calibrator, fit_calibrator, per_class_report, reliability_bins
from lowbit.config import EvaluateParams, ModelParams
from lowbit.formats import load_variant
from lowbit.io import read_json
from lowbit.measure import (
    bits_per_param, disk_bytes, latency_summary, quantized_weight_stats, time_rounds, weight_bytes,
)
from lowbit.metrics import quality_metrics, softmax
from lowbit.models import model_device, param_counts
from lowbit.statistics import metric_intervals, point_metrics
from lowbit.task_types.sequence_classification import make_loader, predict_logits, token_lengths
from lowbit.variants import CARD


@torch.inference_mode()
def evaluate_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, test_frame: pd.DataFrame,
    params: EvaluateParams, max_length: int,
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """(metrics, test logits [n, classes], labels [n]): quality, throughput and latency on the test split."""
    model.eval()
    device = model_device(model)
    ordered, back = in_length_order(tokenizer, test_frame, max_length)
    labels = test_frame["label"].to_numpy()

    def batches(frame: pd.DataFrame) -> Iterator[dict[str, torch.Tensor]]:
        """Tokenized one batch at a time, as the loader makes them: the encoded split is never held whole."""
        for batch in make_loader(tokenizer, frame, params.batch_size, max_length):
            batch.pop("labels")
            yield {k: v.to(device) for k, v in batch.items()}

    forward = lambda batch: model(**batch).logits  # noqa: E731
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # The warm-up sees a full batch and the ragged last one: a compiled program compiles once per
    # shape class (Dynamo specializes a batch of 1), and a 15-30 s compile inside the timed pass
    # turns a 3x speed-up into a slow-down (tests/unit/test_evaluation.py).
    last_start = (len(ordered) - 1) // params.batch_size * params.batch_size
    for rows in [ordered.iloc[:params.batch_size]] * params.warmup_batches + [ordered.iloc[last_start:]]:
        forward(next(batches(rows)))
    sync()

    def timed_pass() -> tuple[np.ndarray, float]:
        """Logits in row order and the seconds spent in forward passes (tokenizing each batch is not timed)."""
        out, elapsed = [], 0.0
        for batch in batches(ordered):
            begin = time.perf_counter()
            out.append(forward(batch).float().cpu().numpy())
            sync()
            elapsed += time.perf_counter() - begin
        return np.concatenate(out)[back], elapsed

    compiled = getattr(model, "compile_seconds", 0.0)
    logits, elapsed = timed_pass()
    if getattr(model, "compile_seconds", 0.0) != compiled:  # it compiled after all: time it again, warm
        logits, elapsed = timed_pass()
    metrics = quality_metrics(logits, labels)
    metrics["throughput_samples_s"] = len(labels) / elapsed
    metrics |= single_example_latency(model, tokenizer, test_frame, params, max_length, device, sync)
    metrics["n_test"] = int(len(labels))
    return metrics, logits, labels


def in_length_order(tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, max_length: int,
                    longest_first: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows sorted by token count (stable: equal lengths keep row order) and the index that puts
    outputs in that order back in row order."""
    lengths = np.array(token_lengths(tokenizer, frame["text"].tolist(), max_length))
    order = np.argsort(-lengths if longest_first else lengths, kind="stable")
    return frame.iloc[order], np.argsort(order)


def predict_in_length_order(model, tokenizer, frame: pd.DataFrame, batch_size: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """predict_logits over length-ordered batches, (logits, labels) in row order.

    Longest first, so that memory does not grow with the split: each batch then fits in what the
    one before it freed. Shortest first, every batch needed larger buffers than any freed before
    and the heap grew with the split's size. Evaluating FP32 with the validation split of the full
    SST-2 train set (6,031 rows) peaked at 1017 MiB shortest first and 909 MiB longest first, 851 MiB
    with a 100-row split; bench/scaling.py's evaluate stage now stays within 4.9% (max length 64)
    and 8.1% (128) from 900 to 54,274 training rows (it grew 19%)."""
    ordered, back = in_length_order(tokenizer, frame, max_length, longest_first=True)
    logits, labels = predict_logits(model, make_loader(tokenizer, ordered, batch_size, max_length))
    return logits[back], labels[back]


def quality_analysis(
    test_logits: np.ndarray, test_labels: np.ndarray, val_logits: np.ndarray, val_labels: np.ndarray,
    params: EvaluateParams, label_names: list[str],
) -> tuple[dict[str, float], dict, Calibrator]:
    """Intervals, calibration (fitted on val only) and the per-class view: (metrics, details, calibrator)."""
    probabilities = softmax(test_logits.astype(np.float64))
    calibrator = fit_calibrator(params.calibration, val_logits, val_labels)
    calibrated = calibrator.apply(test_logits)
    after = point_metrics(calibrated, test_labels)  # the metrics' definitions, on probabilities directly
    per_class = per_class_report(probabilities, test_labels, label_names)
    metrics = metric_intervals(probabilities, test_labels, params.bootstrap_resamples, params.bootstrap_seed)
    metrics |= {"ece_calibrated": after["ece"], "loss_calibrated": after["loss"],
                "recall_min_class": min(c["recall"] for c in per_class["per_class"].values())}
    details = {"per_class": per_class, "calibration_method": params.calibration,
               "reliability": {"before": reliability_bins(probabilities, test_labels),
                               "after": reliability_bins(calibrated, test_labels)}}
    return metrics, details, calibrator


def predict_probabilities(model, tokenizer, texts: list[str], max_length: int, calibrator: Calibrator | None = None,
                          batch_size: int = 64) -> np.ndarray:
    """Class probabilities [n, classes] for raw texts, through the variant's fitted calibrator when given
    (the evaluate stage writes it to metrics/calibrators/<variant>.json: Calibrator.from_json)."""
    logits, _ = predict_in_length_order(model, tokenizer, pd.DataFrame({"text": texts, "label": 0}), batch_size, max_length)
    return calibrator.apply(logits) if calibrator else softmax(logits.astype(np.float64))


def single_example_latency(model, tokenizer, test_frame, params, max_length, device, sync) -> dict[str, float]:
    texts = test_frame["text"].tolist()
    samples = [texts[i % len(texts)] for i in range(params.latency_samples)]
    encoded = [
        {k: v.to(device) for k, v in tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt").items()}
        for t in samples
    ]

    def one_call(i: int) -> None:
        model(**encoded[i])
        sync()

    times = time_rounds(one_call, len(encoded), rounds=params.latency_rounds, warmup=params.warmup_batches)
    return latency_summary(times)


def evaluate_saved_variant(
    variant: str, model_dir: Path, test_frame: pd.DataFrame, val_frame: pd.DataFrame, params: EvaluateParams,
    model_params: ModelParams, label_names: list[str],
) -> tuple[dict, Calibrator, np.ndarray]:
    """Load one saved variant and measure it: quality, bytes held, speed, time for this variant.
    Returns its record, its calibrator and its test predictions (for paired tests against fp32).
    Process memory is measured around this call by tasks.evaluate, each variant in a process of its own
    (lowbit.isolation): a figure read here would carry whatever this process did before."""
    started = time.perf_counter()
    model, tokenizer = load_variant(model_dir, model_params)
    _, total = param_counts(model)
    held = weight_bytes(model)
    quantized_params, quantized_bytes = quantized_weight_stats(model)
    metrics, logits, labels = evaluate_model(model, tokenizer, test_frame, params, model_params.max_length)
    val_logits, val_labels = predict_in_length_order(model, tokenizer, val_frame, params.batch_size, model_params.max_length)
    analysis, details, calibrator = quality_analysis(logits, labels, val_logits, val_labels, params, label_names)
    metrics |= analysis
    card = read_json(model_dir / CARD)
    metrics |= {
        "weight_bytes": held,
        "disk_bytes": disk_bytes(model_dir),
        "total_params": total,
        "bits_per_param": bits_per_param(held, total),
        "quantized_params": quantized_params,
        "quantized_bits_per_param": bits_per_param(quantized_bytes, quantized_params) if quantized_params else None,
        "stage_seconds": time.perf_counter() - started,
    }
    if hasattr(model, "compile_seconds"):  # compiled programs: time spent compiling, inside the warm-up calls
        metrics["compile_seconds"] = model.compile_seconds
    record = {"variant": variant, "format": card["format"], "stage": card["stage"], "model_dir": str(model_dir),
              "metrics": metrics, **details, "producer": card.get("training", {}), "notes": card.get("notes", [])}
    return record, calibrator, logits.argmax(-1)
