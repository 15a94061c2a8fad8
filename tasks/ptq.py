"""ptq: calibrate on the calib split and quantize the FP32 baseline with every configured scheme.

Run: python -m tasks.ptq   (dvc repro ptq; lowbit run)
Reads params: ptq.*, model.*, evaluate.batch_size, determinism.*
Writes: models/ptq/<variant>/ (and reports/sensitivity.* if ptq.sensitivity)
"""

from __future__ import annotations

import functools
import time

import pandas as pd

from lowbit.config import Params
from lowbit.hardware import detect
from lowbit.io import atomic_dir, write_json
from lowbit.measure import peak_rss_bytes, reset_peak_rss
from lowbit.task_types import load_saved
from lowbit.quant.ptq import calibrate, linear_names, quantizable_layers
from tasks.calibration import calib_batches
from lowbit.quant.sensitivity import layer_sensitivity, write_sensitivity
from lowbit.quant.scheme import SchemeContext
from lowbit.quant.schemes import SCHEMES
from lowbit.errors import LowbitError
from lowbit.task_types.sequence_classification import make_loader
from lowbit.train import determinism, int8_inference_allowed
from tasks.plumbing import RESULT_FILE, Paths, StageClock, stage_main

# ptq draws no random numbers from the global generators (the percentile observer samples with
# its own generator, seeded 0); seeding anyway keeps a future draw from depending on the process.
PTQ_SEED = 0


def run_sensitivity(params: Params, paths: Paths, batches: list, out_dir) -> list[dict]:
    """One layer at a time (static int8, first configured observer), scored on the validation split."""
    baseline = paths.models / "baseline"
    model, tokenizer = load_saved(baseline, params.model)
    layers = quantizable_layers(model, params.ptq.skip_modules, params.ptq.quantize_embeddings)
    ranges = calibrate(model, batches, linear_names(layers), params.ptq.observers[0], params.ptq.percentile)
    val = pd.read_parquet(paths.prepared / "val.parquet")
    rows = layer_sensitivity(model, layers, ranges, make_loader(tokenizer, val, params.evaluate.batch_size, params.model.max_length))
    write_sensitivity(rows, out_dir)
    return rows


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    if params.ptq.sensitivity and params.model.task != "sequence_classification":
        raise LowbitError("params.yaml: ptq.sensitivity scores layers by classification accuracy; "
                          f"set it to false for model.task {params.model.task}")
    reset_peak_rss()
    seconds, variants = {}, []
    # Calibration passes and the compiled scheme's Inductor kernels reduce in an order that can follow
    # the thread count (a sum of 10M floats differed between 1 and 2 threads here): same switch as training.
    with determinism(params.determinism, PTQ_SEED, detect()) as applied, atomic_dir(paths.models / "ptq") as out:
        ctx = SchemeContext(
            baseline_dir=paths.models / "baseline", out_root=out, model=params.model,
            skip_modules=params.ptq.skip_modules, quantize_embeddings=params.ptq.quantize_embeddings,
            observers=params.ptq.observers, percentile=params.ptq.percentile, int4_group_size=params.ptq.int4_group_size,
            calib_batches=functools.cache(lambda: calib_batches(paths, params)),
        )
        for scheme in params.ptq.schemes:
            started = time.perf_counter()
            print(f"ptq: {scheme}", flush=True)
            variants += SCHEMES[scheme].build(ctx)
            seconds[f"{scheme}_seconds"] = time.perf_counter() - started
        if params.ptq.sensitivity:
            started = time.perf_counter()
            with int8_inference_allowed():  # scores int8 layers: torch's quantized-resize alert is a false alarm there
                run_sensitivity(params, paths, ctx.calib_batches(), out)
            seconds["sensitivity_seconds"] = time.perf_counter() - started
        result = {"variants": variants, **seconds, "peak_rss_bytes": peak_rss_bytes(), **applied,
                  "stage_seconds": clock.seconds()}
        write_json(out / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    stage_main("ptq", run)
