"""evaluate: one harness, every variant found under models/, the test split.

Run: python -m tasks.evaluate   (dvc repro evaluate; lowbit run)
Reads params: evaluate.*, model.max_length, model.trust_remote_code   Writes: metrics/<variant>.json

When stages failed, the flow names them in LOWBIT_EXCLUDE_STAGES (JSON {stage: why}) and runs
this stage outside DVC: their variants are left out even where an earlier run's model is still
on disk (it was made from other inputs), and listed under `missing` in metrics/lowbit_stage.json.
"""

from __future__ import annotations

import pandas as pd
import torch

from lowbit.config import Params
from lowbit.errors import LowbitError
from lowbit.evaluation import evaluate_saved_variant
from lowbit.hardware import describe_environment, detect, evaluation_threads
from lowbit.io import atomic_dir, read_json, write_json
from tasks.plumbing import RESULT_FILE, Paths, StageClock, excluded_stages, stage_main
from lowbit.formats import discover
from lowbit.variants import CARD


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
    summary = {}
    with atomic_dir(paths.metrics) as out:
        for variant, model_dir in variants.items():
            print(f"evaluate: {variant} ({model_dir.relative_to(paths.root)})", flush=True)
            record = evaluate_saved_variant(variant, model_dir, test, params.evaluate, params.model)
            record["model_dir"] = str(model_dir.relative_to(paths.root))  # a checkout elsewhere writes the same file
            record["threads"] = torch.get_num_threads()
            record["report_order"] = len(summary)  # discover() returns variants in report order
            write_json(out / f"{variant}.json", record)
            summary[variant] = record["metrics"]["accuracy"]
        result = {"accuracy": summary, "missing": missing, "hardware": describe_environment(),
                  "stage_seconds": clock.seconds()}
        write_json(out / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    stage_main("evaluate", run)
