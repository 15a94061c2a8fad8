"""evaluate: one harness, every variant found under models/, the test split.

Run: python -m tasks.evaluate   (dvc repro evaluate; lowbit run)
Reads params: evaluate.*, model.max_length, model.trust_remote_code   Writes: metrics/<variant>.json
"""

from __future__ import annotations

import pandas as pd
import torch

from lowbit.config import Params
from lowbit.errors import LowbitError
from lowbit.evaluation import evaluate_saved_variant
from lowbit.io import atomic_dir, write_json
from lowbit.stages import RESULT_FILE, Paths, StageClock, stage_main
from lowbit.variants import discover


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    if params.evaluate.num_threads:
        torch.set_num_threads(params.evaluate.num_threads)
    variants = discover(paths.models)
    if not variants:
        raise LowbitError(f"no model variants under {paths.models}; run the baseline stage first (lowbit run)")
    test = pd.read_parquet(paths.prepared / "test.parquet")
    summary = {}
    with atomic_dir(paths.metrics) as out:
        for variant, model_dir in variants.items():
            print(f"evaluate: {variant} ({model_dir.relative_to(paths.root)})", flush=True)
            record = evaluate_saved_variant(variant, model_dir, test, params.evaluate, params.model)
            record["threads"] = torch.get_num_threads()
            write_json(out / f"{variant}.json", record)
            summary[variant] = record["metrics"]["accuracy"]
        result = {"accuracy": summary, "stage_seconds": clock.seconds()}
        write_json(out / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    stage_main("evaluate", run)
