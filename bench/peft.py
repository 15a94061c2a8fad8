"""PEFT benchmark on SST-2: full fine-tune vs LoRA vs QLoRA, 3 seeds, JSON out.

Run: python -m bench.peft [--seeds 0 1 2] [--out bench/results/peft.json]   (about 7 minutes a seed here)

Per method: accuracy mean±std, training wall time, trainable parameter share, and
training memory three ways (each stage in its own process):
- train_peak_rss_bytes: the process's peak RSS while training, libraries included
  (bitsandbytes alone adds about 50 MB to the QLoRA process);
- train_memory_bytes (derived): weight_bytes of the trained model + the RSS growth over
  training (peak − RSS at its start, freed heap handed back first): what training needs;
- train_state_bytes: weights + gradients + optimizer state, summed over tensors.
`targets` checks the goals of issue 4; the memory ordering is judged on train_memory_bytes.
"""

from __future__ import annotations

import statistics

import torch

from bench.common import emit, mean_std, parse_args, project, require_sst2, run_stage, stage_result, variant_metrics

METHODS = {"full": ("baseline", "fp32"), "lora": ("lora", "lora"), "qlora": ("qlora", "qlora")}


def main() -> None:
    args = parse_args(__doc__)
    require_sst2()
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    merged: dict[str, list[float]] = {"lora_merged": [], "qlora_merged": []}
    for seed in args.seeds:
        root = project("peft", seed, ["ptq.schemes=[]", "lora.epochs=1", "qlora.epochs=1",
                                      f"lora.seed={seed}", f"qlora.seed={seed}"], args.reuse)
        for stage in ("evaluate",) if args.reuse else ("prepare", "baseline", "lora", "qlora", "evaluate"):
            run_stage(root, stage)
        trained = {method: stage_result(root, stage) for method, (stage, _) in METHODS.items()}
        metrics = variant_metrics(root)
        for method, (_, variant) in METHODS.items():
            runs[method].append({"accuracy": metrics[variant]["metrics"]["accuracy"], **trained[method]})
        for name in merged:
            merged[name].append(metrics[name]["metrics"]["accuracy"])
    summary = {
        method: {
            "accuracy": mean_std([r["accuracy"] for r in rs]),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
            "train_peak_rss_bytes": statistics.fmean(r["peak_rss_bytes"] for r in rs),
            "train_rss_growth_bytes": statistics.fmean(r["peak_rss_growth_bytes"] for r in rs),
            "train_memory_bytes": statistics.fmean(r["train_memory_bytes"] for r in rs),
            "train_state_bytes": statistics.fmean(r["train_state_bytes"] for r in rs),
            "trainable_share": rs[0]["trainable_params"] / rs[0]["total_params"],
            "optimizer": rs[0].get("optimizer", "AdamW"),
            "compute_dtype": rs[0].get("compute_dtype", "float32"),
        }
        for method, rs in runs.items()
    }
    summary |= {name: {"accuracy": mean_std(values)} for name, values in merged.items()}
    acc = {m: summary[m]["accuracy"]["mean"] for m in METHODS}
    memory = {m: summary[m]["train_memory_bytes"] for m in METHODS}
    rss = {m: summary[m]["train_peak_rss_bytes"] for m in METHODS}
    state = {m: summary[m]["train_state_bytes"] for m in METHODS}
    result = {
        "benchmark": "peft", "data": "SST-2: 4,000 train rows (seed 0), 1 epoch, max length 64, 872 dev rows",
        "seeds": args.seeds, "evaluate_rerun_on_kept_models": args.reuse, "torch": torch.__version__, "cuda": torch.cuda.is_available(), "methods": summary,
        "targets": {
            "lora_accuracy_ge_0.787": acc["lora"] >= 0.787,
            "qlora_accuracy_ge_0.792": acc["qlora"] >= 0.792,
            "qlora_within_1_point_of_lora": abs(acc["qlora"] - acc["lora"]) * 100 <= 1.0,
            "train_memory_qlora_lt_lora_lt_full": memory["qlora"] < memory["lora"] < memory["full"],
            "process_peak_rss_qlora_lt_lora_lt_full": rss["qlora"] < rss["lora"] < rss["full"],
            "train_state_bytes_qlora_lt_lora_lt_full": state["qlora"] < state["lora"] < state["full"],
            "lora_trainable_share_lt_1pct": summary["lora"]["trainable_share"] < 0.01,
        },
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
