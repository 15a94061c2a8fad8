"""qat: fine-tune the FP32 baseline with fake-quantized weights and activations, then convert to real int8.

Run: python -m tasks.qat   (dvc repro qat; lowbit run)
Reads params: qat.*, ptq.skip_modules, ptq.quantize_embeddings, model.*   Writes: models/qat/
"""

from __future__ import annotations

import math

import pandas as pd

from lowbit.config import Params
from lowbit.io import atomic_dir, write_json
from lowbit.models import load_classifier, load_tokenizer, param_counts
from lowbit.quant.ptq import quantizable_layers
from lowbit.quant.qat import convert_qat, freeze_observers, prepare_qat
from lowbit.quant.schemes import save_int8
from lowbit.stages import RESULT_FILE, Paths, StageClock, stage_main
from lowbit.train import train


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    baseline = paths.models / "baseline"
    model, tokenizer = load_classifier(str(baseline), params.model), load_tokenizer(str(baseline), params.model)
    train_frame = pd.read_parquet(paths.prepared / "train.parquet")
    prepare_qat(model, quantizable_layers(model, params.ptq.skip_modules, params.ptq.quantize_embeddings))
    total_steps = params.qat.epochs * math.ceil(len(train_frame) / params.qat.batch_size)
    freeze_at = max(1, int(params.qat.observer_freeze_fraction * total_steps))
    fit = train(
        model, tokenizer, train_frame, pd.read_parquet(paths.prepared / "val.parquet"), params.qat,
        params.model.max_length, on_step=lambda step: step == freeze_at and freeze_observers(model),
    )
    trainable, total = param_counts(model)
    layout = convert_qat(model)
    result = {"variant": "qat_int8", **fit.figures(), "observers_frozen_at_step": freeze_at, "trainable_params": trainable}
    with atomic_dir(paths.models / "qat") as out:
        notes = [f"fake-quantized fine-tune from fp32 ({params.qat.epochs} epoch(s)); observers frozen at step {freeze_at}"]
        save_int8(model, tokenizer, out, "qat_int8", layout, notes, stage="qat", training=dict(result))
        result["stage_seconds"] = clock.seconds()
        write_json(out / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    stage_main("qat", run)
