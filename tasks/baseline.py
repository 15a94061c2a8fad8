"""baseline: full FP32 fine-tune of the pretrained model, best-on-validation checkpoint.

Run: python -m tasks.baseline   (dvc repro baseline; lowbit run)
Reads params: model.*, baseline.*, determinism.*   Writes: models/baseline/ (safetensors + tokenizer + card)
"""

from __future__ import annotations

import pandas as pd

from lowbit.config import Params
from lowbit.hardware import detect
from lowbit.io import atomic_dir, read_json, write_json
from lowbit.models import load_tokenizer, param_counts, resolve_model, save_model
from lowbit.task_types import task_type
from lowbit.train import determinism, train
from lowbit.variants import ZERO_SHOT, write_card
from tasks.plumbing import RESULT_FILE, Paths, StageClock, stage_main


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    meta = read_json(paths.prepared / "meta.json")
    source = resolve_model(params.model.name)
    tokenizer = load_tokenizer(source, params.model)
    # seeded here: the new head's initial weights come from the seed, not the process
    with determinism(params.determinism, params.baseline.seed, detect()) as applied:
        model = task_type(params.model).load_pretrained(source, params.model, meta)
        fit = train(
            model, tokenizer, pd.read_parquet(paths.prepared / "train.parquet"), pd.read_parquet(paths.prepared / "val.parquet"),
            params.baseline, params.model.max_length, task=params.model.task,
        )
    trainable, total = param_counts(model)
    result = {"variant": "fp32", **fit.figures(), "trainable_params": trainable, "total_params": total, **applied}
    with atomic_dir(paths.models / "baseline") as out:
        save_model(model, tokenizer, out)
        write_card(out, "fp32", "hf", "baseline", base_model=params.model.name, training=result)
        if params.model.task == "causal_lm":  # a chat model can answer untrained: every fine-tune is judged against that
            write_card(out / ZERO_SHOT, ZERO_SHOT, "pretrained", "baseline", base_model=params.model.name,
                       notes=["the pretrained model, not fine-tuned (zero-shot)"])
        result["stage_seconds"] = clock.seconds()
        write_json(out / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    stage_main("baseline", run)
