"""ptq_nf4 in each compute dtype against FP32 on a finished project: the figures behind
lowbit.hardware.nf4_compute_dtype. JSON out.

Run: python -m bench.nf4_dtype [--project DIR] [--isa native|avx2] [--out FILE]
(about a minute on 2 cores; DIR is a finished lowbit project, default bench/.work/overhead-default-lowbit;
FILE defaults to bench/results/nf4-dtype-KIND.json, KIND this CPU's int8 kernel family as bench.quant
names it, with -as-avx2 under --isa avx2: each kind of CPU keeps its own figures)

Each mode is measured in a fresh process of its own by lowbit's evaluation harness on the project's
test split (accuracy, throughput at the evaluation batch size, batch-1 latency p50):
- fp32                the baseline;
- nf4_bf16_fused      ptq_nf4 in bf16 through bitsandbytes' fused AVX512-BF16 layout (only where
                      bitsandbytes has that kernel: what lowbit serves on such a CPU);
- nf4_bf16            ptq_nf4 in bf16, weights dequantized at every call, matmul by torch/oneDNN;
- nf4_fp32            ptq_nf4 in fp32, the same way (what lowbit serves without native bf16).

--isa avx2 runs each process with torch's and oneDNN's AVX2 code paths (ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2): bf16 matmuls are then emulated, as on an AVX2-only CPU. bitsandbytes' own
dequantization still dispatches on this CPU's flags, so these are an emulation's figures, not an AVX2
machine's; the fused mode is left out there (its kernel is AVX512-BF16 code).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, WORK, code_version, emit

MODES = ("fp32", "nf4_bf16_fused", "nf4_bf16", "nf4_fp32")
AVX2_PATHS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def child(project: Path, mode: str) -> dict:
    """In a fresh process: load the mode's variant as it would be served, then set its dtype and layout."""
    import pandas as pd
    import torch

    from lowbit.config import load_params
    from lowbit.evaluation import evaluate_model
    from lowbit.formats import load_variant
    from lowbit.quant.bnb import four_bit_layers, set_4bit_compute_dtype

    params = load_params(project / "params.yaml")
    variant = "fp32" if mode == "fp32" else "ptq_nf4"
    model_dir = Path(json.loads((project / "metrics" / f"{variant}.json").read_text())["model_dir"])
    model, tokenizer = load_variant(model_dir, params.model)
    if mode != "fp32":
        set_4bit_compute_dtype(model, torch.float32 if mode == "nf4_fp32" else torch.bfloat16)
        for layer in four_bit_layers(model):  # before the first call: bitsandbytes repacks at it
            layer.support_avx512bf16_for_cpu = mode == "nf4_bf16_fused"
    test = pd.read_parquet(project / "data" / "prepared" / "test.parquet")
    metrics, _, _ = evaluate_model(model, tokenizer, test, params.evaluate, params.model.max_length)
    return {key: metrics[key] for key in ("accuracy", "throughput_samples_s", "latency_ms_p50")} | {
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def measure(project: Path, mode: str, isa: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(AVX2_PATHS if isa == "avx2" else {})}
    # from this checkout, not the project: a project made by bench.common holds a copy of lowbit's code
    done = subprocess.run([sys.executable, "-m", "bench.nf4_dtype", "--child", mode, "--project", str(project)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{mode} ({isa}) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=WORK / "overhead-default-lowbit")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    project = args.project.resolve()
    if args.child:
        os.chdir(project)  # relative paths in params.yaml resolve as in the run
        print(json.dumps(child(project, args.child)))
        return

    from lowbit.hardware import detect, int8_kernel_family  # lowbit first: it quiets bitsandbytes' Hub-kernel message
    import bitsandbytes as bnb

    caps = detect()
    out = args.out or REPO / "bench" / "results" / (
        f"nf4-dtype-{int8_kernel_family(caps)}" + ("-as-avx2" if args.isa == "avx2" else "") + ".json")
    fused = bool(bnb.functional.has_avx512bf16()) and args.isa == "native"
    modes = [mode for mode in MODES if mode != "nf4_bf16_fused" or fused]
    results = {mode: measure(project, mode, args.isa) for mode in modes}
    fp32 = results["fp32"]
    for result in results.values():
        result["throughput_vs_fp32"] = result["throughput_samples_s"] / fp32["throughput_samples_s"]
        result["latency_vs_fp32"] = result["latency_ms_p50"] / fp32["latency_ms_p50"]
    emit({"benchmark": "nf4_dtype", "project": str(project), "lowbit_commit": code_version(), "isa": args.isa,
          "emulated": args.isa != "native", "hardware": caps.describe(), "modes": results}, out)


if __name__ == "__main__":
    main()
