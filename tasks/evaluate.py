"""evaluate: one harness, every variant found under models/, the test split.

Run: python -m tasks.evaluate   (dvc repro evaluate; lowbit run)
Reads params: evaluate.*, model.max_length, model.trust_remote_code
Writes: metrics/<variant>.json (quality with 95% intervals, calibration before/after, per-class view,
the paired test against fp32, memory, speed), metrics/calibrators/<variant>.json (fitted on val)

Each variant is loaded and measured in a child process of its own (lowbit.isolation), so its memory
figures do not depend on which variants ran before it:
- peak_rss_bytes: that child's peak resident memory (libraries, data, model, forward passes);
- import_floor_bytes: the same for a child that loads no model (the libraries and the data);
- serving_memory_bytes (derived) = peak_rss_bytes − import_floor_bytes: what serving the variant adds.

When stages failed, the flow names them in LOWBIT_EXCLUDE_STAGES (JSON {stage: why}) and runs
this stage outside DVC: their variants are left out even where an earlier run's model is still
on disk (it was made from other inputs), and listed under `missing` in metrics/lowbit_stage.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from lowbit.calibration import Calibrator
from lowbit.config import Params
from lowbit.errors import LowbitError
from lowbit.evaluation import evaluate_saved_variant
from lowbit.generation import evaluate_generative_variant
from lowbit.formats import discover
from lowbit.hardware import describe_environment, detect, evaluation_threads
from lowbit.io import atomic_dir, read_json, write_json
from lowbit.isolation import Isolated
from lowbit.statistics import paired_comparison
from lowbit.variants import BASELINE, CARD
from tasks.plumbing import RESULT_FILE, Paths, StageClock, excluded_stages, stage_main

# What every child needs, imported once by the forkserver (torch, transformers and, through them,
# peft and bitsandbytes): a child then starts with a fork. What a format needs beyond that (e.g.
# Inductor's compiler for the compiled program) is imported by its child and counts in its serving
# memory, as it would in a process serving that variant.
CHILD_IMPORTS = {"sequence_classification": ["lowbit.evaluation"], "causal_lm": ["lowbit.generation"]}


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    torch.set_num_threads(evaluation_threads(params.evaluate.num_threads, detect()))
    missing = {stage: {"reason": why, "variants": []} for stage, why in excluded_stages().items()}
    variants = {}
    for variant, model_dir in discover(paths.models).items():
        stage = read_json(model_dir / CARD)["stage"]
        if stage in missing:
            missing[stage]["variants"].append(variant)
        else:
            variants[variant] = model_dir
    if not variants:
        raise LowbitError(f"no model variants to evaluate under {paths.models}; run the baseline stage first (lowbit run)")
    test = pd.read_parquet(paths.prepared / "test.parquet")
    val = pd.read_parquet(paths.prepared / "val.parquet")
    meta = read_json(paths.prepared / "meta.json")
    summary, reference = {}, None
    threads = torch.get_num_threads()
    with atomic_dir(paths.metrics) as out:
        for variant, record, calibrator, predictions in measure_variants(variants, test, val, params, meta, threads):
            if predictions is not None:  # a classifier's: the paired test against fp32 on the same rows
                correct = predictions == test["label"].to_numpy()
                if variant == BASELINE:  # discover() yields it first: every other variant is compared with it
                    reference = correct
                if reference is not None:
                    record["metrics"] |= compared_with_baseline(correct, reference, params)
            record["model_dir"] = str(variants[variant].relative_to(paths.root))  # a checkout elsewhere writes the same file
            record["threads"] = threads
            record["report_order"] = len(summary)  # discover() returns variants in report order
            write_json(out / f"{variant}.json", record)
            if calibrator is not None:
                write_json(out / "calibrators" / f"{variant}.json", calibrator.to_json())
            summary[variant] = record["metrics"][record.get("quality_metric", "accuracy")]
        quality = record.get("quality_metric", "accuracy")
        result = {quality: summary, "missing": missing, "hardware": describe_environment(),
                  "stage_seconds": clock.seconds()}
        write_json(out / RESULT_FILE, result)
    return result


def measure_variants(variants: dict[str, Path], test: pd.DataFrame, val: pd.DataFrame, params: Params,
                     meta: dict, threads: int) -> Iterator[tuple[str, dict, Calibrator | None, np.ndarray | None]]:
    """(variant, record, calibrator, test predictions) for each variant in turn, each measured in a
    child process of its own, with the memory figures the module docstring defines. A causal LM's
    variants have no calibrator and no class predictions (None)."""
    with Isolated(preload=CHILD_IMPORTS[params.model.task]) as isolated:
        floor = isolated.floor(test, val)
        for variant, model_dir in variants.items():
            print(f"evaluate: {variant} ({model_dir})", flush=True)
            if params.model.task == "causal_lm":
                record, peak = isolated.call(evaluate_generative_variant, variant, model_dir, test, val, params.evaluate,
                                             params.model, meta, threads=threads)
                calibrator = predictions = None
            else:
                (record, calibrator, predictions), peak = isolated.call(
                    evaluate_saved_variant, variant, model_dir, test, val, params.evaluate, params.model, meta["labels"],
                    threads=threads)
            record["metrics"] |= {"peak_rss_bytes": peak, "import_floor_bytes": floor, "serving_memory_bytes": peak - floor}
            yield variant, record, calibrator, predictions


def compared_with_baseline(correct: np.ndarray, reference: np.ndarray, params: Params) -> dict:
    """McNemar's exact test and a paired-bootstrap interval of the accuracy delta vs fp32, on the same rows."""
    evaluate = params.evaluate
    compared = paired_comparison(correct, reference, evaluate.bootstrap_resamples, evaluate.bootstrap_seed,
                                 evaluate.significance_level)
    compared["accuracy_delta_significant"] = float(compared.pop("significant"))  # MLflow metrics are numbers
    return compared


if __name__ == "__main__":
    stage_main("evaluate", run)
