"""Quantization benchmark on SST-2: every PTQ variant and QAT against FP32, 3 seeds, JSON out.

Run: python -m bench.quant [--seeds 0 1 2] [--out bench/results/quant.json] [--reuse]   (about 14 minutes a seed
here; --reuse reruns only evaluate on the models a previous run left, about 2.5 minutes a seed)

Per variant: accuracy mean±std over seeds, weight_bytes, bits_per_param,
quantized_bits_per_param, latency p50 at batch 1 and throughput at batch 64, with
speed-ups against FP32 measured in the same evaluate process. `targets` checks the
figures against the goals of issue 3.
"""

from __future__ import annotations

import platform
import statistics
from pathlib import Path

import torch

from bench.common import emit, mean_std, parse_args, project, require_sst2, run_stage, stage_result, variant_metrics

STAGES = ("prepare", "baseline", "ptq", "qat", "evaluate")


def summarise(per_seed: list[dict[str, dict]]) -> dict:
    variants = {}
    for name in per_seed[0]:
        runs = [seed[name]["metrics"] for seed in per_seed]
        fp32 = [seed["fp32"]["metrics"] for seed in per_seed]
        variants[name] = {
            "accuracy": mean_std([m["accuracy"] for m in runs]),
            "accuracy_delta_points": mean_std([(m["accuracy"] - f["accuracy"]) * 100 for m, f in zip(runs, fp32)]),
            "weight_bytes": runs[0]["weight_bytes"],
            "weight_share_of_fp32": runs[0]["weight_bytes"] / fp32[0]["weight_bytes"],
            "bits_per_param": runs[0]["bits_per_param"],
            "quantized_bits_per_param": runs[0]["quantized_bits_per_param"],
            "latency_ms_p50_batch1": statistics.fmean(m["latency_ms_p50"] for m in runs),
            "throughput_samples_s_batch64": statistics.fmean(m["throughput_samples_s"] for m in runs),
            "latency_speedup_vs_fp32": statistics.fmean(f["latency_ms_p50"] / m["latency_ms_p50"] for m, f in zip(runs, fp32)),
            "throughput_speedup_vs_fp32": statistics.fmean(m["throughput_samples_s"] / f["throughput_samples_s"] for m, f in zip(runs, fp32)),
            "notes": per_seed[0][name].get("notes", []),
        }
        if "compile_seconds" in runs[0]:  # compiled programs: first-call compilation, Inductor cache as found
            variants[name]["compile_seconds"] = [m["compile_seconds"] for m in runs]
    return variants


def targets(v: dict) -> dict:
    int8 = {k: x for k, x in v.items() if k.startswith(("ptq_int8_weight", "ptq_int8_dyn", "ptq_int8_static", "qat_int8"))}
    static = {k: x for k, x in v.items() if k.startswith("ptq_int8_static")}
    best_static = max(static, key=lambda k: static[k]["accuracy"]["mean"])
    best_ptq = max((k for k in v if k.startswith("ptq_")), key=lambda k: v[k]["accuracy"]["mean"])
    qat_delta = v["qat_int8"]["accuracy_delta_points"]["mean"]
    fastest = max(int8, key=lambda k: int8[k]["latency_speedup_vs_fp32"])
    best_static_tput = max(static, key=lambda k: static[k]["throughput_speedup_vs_fp32"])
    return {
        "int8_weight_share_le_0.27": {k: x["weight_share_of_fp32"] <= 0.27 for k, x in int8.items()},
        "nf4_quantized_bits_le_4.3": v["ptq_nf4"]["quantized_bits_per_param"] <= 4.3,
        "best_static_within_1_point": {"variant": best_static, "delta": static[best_static]["accuracy_delta_points"]["mean"],
                                       "met": static[best_static]["accuracy_delta_points"]["mean"] >= -1.0},
        "qat_within_0.5_or_beats_best_ptq": {"qat_delta": qat_delta, "best_ptq": best_ptq,
                                             "met": qat_delta >= -0.5 or v["qat_int8"]["accuracy"]["mean"] > v[best_ptq]["accuracy"]["mean"]},
        "int8_latency_speedup_ge_1.5": {"variant": fastest, "speedup": int8[fastest]["latency_speedup_vs_fp32"],
                                        "met": int8[fastest]["latency_speedup_vs_fp32"] >= 1.5},
        "static_int8_throughput_speedup_ge_3": {"variant": best_static_tput, "speedup": static[best_static_tput]["throughput_speedup_vs_fp32"],
                                                "met": static[best_static_tput]["throughput_speedup_vs_fp32"] >= 3.0},
    }


def cpu_model() -> str:
    """The CPU's name: int8 speed-ups depend on it (VNNI/AMX or not)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args(__doc__)
    require_sst2()
    per_seed, stage_seconds = [], []
    for seed in args.seeds:
        root = project("quant", seed, [f"qat.seed={seed}"], args.reuse)
        for stage in ("evaluate",) if args.reuse else STAGES:
            run_stage(root, stage)
        stage_seconds.append({stage: stage_result(root, stage)["stage_seconds"] for stage in STAGES})
        per_seed.append(variant_metrics(root))
    variants = summarise(per_seed)
    result = {
        "benchmark": "quant", "data": "SST-2: 4,000 train rows (seed 0), 1 epoch, max length 64, 872 dev rows",
        "seeds": args.seeds, "evaluate_rerun_on_kept_models": args.reuse, "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
        "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "stage_seconds": stage_seconds, "variants": variants, "targets": targets(variants),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
