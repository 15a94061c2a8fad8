"""The evaluation harness of a causal LM variant: the test split scored teacher-forced, a fixed sample generated.

    record = evaluate_generative_variant(variant, model_dir, test, val, params.evaluate, params.model, meta)

Teacher-forced over every test example (target tokens only, lowbit.task_types.causal_lm):
`loss` (mean NLL per target token), `perplexity` = exp(loss) (derived), `token_accuracy` (the share of
target tokens the model ranks first), each with a 95% interval from a seeded bootstrap over examples.
Generation over the first `evaluate.generation_samples` test examples (the split is a seeded shuffle:
a fixed sample), greedy, one prompt at a time, at most `evaluate.max_new_tokens` new tokens:
`exact_match`, `rouge_l`, `chrf` (lowbit's own metric modules; chrF with a bootstrap interval),
`eot_share` (the share of answers that end their turn with the end-of-turn token rather than running
into the limit), `token_ece` (calibration of the next-token confidence, target tokens, 15 bins;
its bins are the record's `reliability`), `latency_ms_p50`/`p95` (milliseconds per generated token, per prompt: a prompt's
time over its new tokens, prefill included) and `tokens_s` (all new tokens over all generation time).
Five generations go into the record with their prompts and references. Memory figures are added
around the call by tasks.evaluate, each variant in a process of its own, as for classifiers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lowbit.calibration import confidence_bins, expected_calibration_error
from lowbit.config import EvaluateParams, ModelParams
from lowbit.formats import load_variant
from lowbit.io import read_json
from lowbit.measure import bits_per_param, disk_bytes, quantized_weight_stats, weight_bytes
from lowbit.metrics.generation import chrf_interval, generation_metrics
from lowbit.models import model_device, param_counts, resolve_model
from lowbit.statistics import ratio_intervals
from lowbit.task_types.causal_lm import end_of_turn_id, make_loader, prompt_ids, score_examples, token_figures
from lowbit.variants import CARD

SAMPLES_IN_REPORT = 5


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[bool], np.ndarray, np.ndarray]:
    """(answers, ended with the end-of-turn token, new tokens per prompt, seconds per prompt): greedy, batch of 1."""
    eot = end_of_turn_id(tokenizer)
    device = model_device(model)
    answers, ended, counts, seconds = [], [], [], []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
        begin = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eot, pad_token_id=eot)
        seconds.append(time.perf_counter() - begin)
        new = out[0, ids.shape[1]:].tolist()
        ended.append(bool(new) and new[-1] == eot)
        counts.append(len(new))
        answers.append(tokenizer.decode(new[:-1] if ended[-1] else new, skip_special_tokens=True).strip())
    return answers, ended, np.asarray(counts), np.asarray(seconds)


def evaluate_generative_model(model, tokenizer, test_frame: pd.DataFrame, params: EvaluateParams,
                              max_length: int) -> tuple[dict, list[dict], dict]:
    """(metrics, sample generations, token reliability bins) on the test split: the module docstring's figures."""
    model.eval()
    sums = score_examples(model, make_loader(tokenizer, test_frame, params.batch_size, max_length))
    metrics = token_figures(sums) | {"n_test": int(len(test_frame))}
    sample = test_frame.iloc[: params.generation_samples]
    prompts, references = sample["prompt"].tolist(), sample["target"].tolist()
    generate_answers(model, tokenizer, prompts[:1], 2)  # warm-up: first-call allocations are not a token's latency
    answers, ended, counts, seconds = generate_answers(model, tokenizer, prompts, params.max_new_tokens)
    metrics |= generation_metrics(answers, references)
    metrics |= {"eot_share": float(np.mean(ended)), "tokens_s": float(counts.sum() / seconds.sum()),
                "latency_ms_p50": float(np.percentile(1000 * seconds / np.maximum(counts, 1), 50)),
                "latency_ms_p95": float(np.percentile(1000 * seconds / np.maximum(counts, 1), 95)),
                "generated_tokens": int(counts.sum()), "n_generated": len(prompts)}
    columns = {"token_accuracy": (sums["correct"], sums["tokens"]), "loss": (sums["nll"], sums["tokens"])}
    intervals = ratio_intervals(columns, params.bootstrap_resamples, params.bootstrap_seed)
    intervals["chrf_ci_low"], intervals["chrf_ci_high"] = chrf_interval(answers, references, params.bootstrap_resamples,
                                                                        params.bootstrap_seed)
    intervals |= {"perplexity_ci_low": math.exp(intervals["loss_ci_low"]), "perplexity_ci_high": math.exp(intervals["loss_ci_high"])}
    metrics |= intervals
    reliability = {"before": confidence_bins(sums["token_confidence"], sums["token_correct"])}
    metrics["token_ece"] = expected_calibration_error(reliability["before"])
    samples = [{"prompt": p, "reference": r, "generation": a, "ended": e}
               for p, r, a, e in zip(prompts, references, answers, ended)][:SAMPLES_IN_REPORT]
    return metrics, samples, reliability


def evaluate_generative_variant(
    variant: str, model_dir: Path, test_frame: pd.DataFrame, val_frame: pd.DataFrame, params: EvaluateParams,
    model_params: ModelParams, meta: dict,
) -> dict:
    """Load one saved variant and measure it; its record (tasks.evaluate writes it to metrics/<variant>.json)."""
    started = time.perf_counter()
    card = read_json(model_dir / CARD)
    model, tokenizer = load_variant(model_dir, model_params)
    _, total = param_counts(model)
    held = weight_bytes(model)
    quantized_params, quantized_bytes = quantized_weight_stats(model)
    metrics, samples, reliability = evaluate_generative_model(model, tokenizer, test_frame, params, model_params.max_length)
    files = resolve_model(card["base_model"]) if card["format"] == "pretrained" else model_dir  # zero-shot: the model itself
    metrics |= {
        "weight_bytes": held, "disk_bytes": disk_bytes(files), "total_params": total,
        "bits_per_param": bits_per_param(held, total), "quantized_params": quantized_params,
        "quantized_bits_per_param": bits_per_param(quantized_bytes, quantized_params) if quantized_params else None,
        "stage_seconds": time.perf_counter() - started,
    }
    return {"variant": variant, "task": "causal_lm", "quality_metric": "token_accuracy", "format": card["format"],
            "stage": card["stage"], "model_dir": str(model_dir), "metrics": metrics, "samples": samples, "reliability": reliability,
            "producer": card.get("training", {}), "notes": card.get("notes", [])}
