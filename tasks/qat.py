"""qat: fine-tune the FP32 baseline with fake-quantized weights and activations, then convert to real int8.

Run: python -m tasks.qat   (dvc repro qat; lowbit run)
Reads params: qat.*, ptq.skip_modules, ptq.quantize_embeddings, ptq.calib_rows, ptq.calib_batch_size,
ptq.percentile, model.*, determinism.*   Writes: models/qat/
"""

from __future__ import annotations

import math

import pandas as pd

from lowbit.config import Params
from lowbit.hardware import detect
from lowbit.io import atomic_dir, write_json
from lowbit.models import param_counts
from lowbit.task_types import load_saved
from lowbit.quant.ptq import calibrate, linear_names, quantizable_layers
from tasks.calibration import calib_batches
from lowbit.quant.qat import convert_qat, freeze_observers, prepare_qat
from lowbit.quant.storage import save_int8
from lowbit.train import determinism, train
from tasks.plumbing import RESULT_FILE, Paths, StageClock, stage_main


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    cfg = params.qat
    baseline = paths.models / "baseline"
    with determinism(params.determinism, cfg.seed, detect()) as applied:  # from the calibration on: it follows threads too
        model, tokenizer = load_saved(baseline, params.model)
        train_frame = pd.read_parquet(paths.prepared / "train.parquet")
        layers = quantizable_layers(model, params.ptq.skip_modules, params.ptq.quantize_embeddings)
        ranges = None
        if cfg.init_observer != "ema":
            ranges = calibrate(model, calib_batches(paths, params), linear_names(layers), cfg.init_observer,
                               params.ptq.percentile)
        prepare_qat(model, layers, ranges)
        total_steps = cfg.epochs * math.ceil(len(train_frame) / cfg.batch_size)
        freeze_at = int(cfg.observer_freeze_fraction * total_steps)
        if ranges is None:
            freeze_at = max(1, freeze_at)  # EMA ranges need at least one batch to form
        if freeze_at == 0:
            freeze_observers(model)
        fit = train(
            model, tokenizer, train_frame, pd.read_parquet(paths.prepared / "val.parquet"), cfg,
            params.model.max_length, on_step=lambda step: step == freeze_at and freeze_observers(model),
            task=params.model.task,
        )
    trainable, total = param_counts(model)
    layout = convert_qat(model)
    result = {"variant": "qat_int8", **fit.figures(), "init_observer": cfg.init_observer,
              "observers_frozen_at_step": freeze_at, "trainable_params": trainable, **applied}
    with atomic_dir(paths.models / "qat") as out:
        start = "training batches (EMA)" if ranges is None else f"{cfg.init_observer} calibration"
        notes = [f"fake-quantized fine-tune from fp32 ({cfg.epochs} epoch(s)); activation ranges from {start}, "
                 f"frozen at step {freeze_at} of {total_steps}"]
        save_int8(model, tokenizer, out, "qat_int8", layout, notes, stage="qat", training=dict(result))
        result["stage_seconds"] = clock.seconds()
        write_json(out / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    stage_main("qat", run)
