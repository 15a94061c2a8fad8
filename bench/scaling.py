"""Scaling benchmark on SST-2: wall time and peak RSS of prepare, baseline and evaluate as training rows grow.

Run: python -m bench.scaling [--rows 1000 4000 16000 full] [--lengths 64 128]
                             [--out bench/results/scaling.json] [--plot bench/results/scaling.png]
                             [--add-to bench/results/scaling.json]  (measure only the points given, keep the rest)
Time: about 40 minutes for the default grid on an idle 2-core AVX512 machine (18 for max length 64,
22 for 128): baseline 13-14 s per 1k training rows with batches grouped by length, over about 73k
training rows a length (900 + 3,600 + 14,400 + about 54,000), plus about a minute a point. Give --out
with --add-to to keep the merged result (without --out it is only printed). Max length 128 costs about what 64
does on SST-2: texts average 13 tokens (4 of 60,614 exceed 64) and batches are padded to their longest.
On a loaded machine it is far longer: the smoke test `--rows 300 600 --lengths 64`, niced beside other
work, took about 7 minutes, with baseline at 180-245 s per 1k training rows, evaluate about 75 s plus
13 s per 1k (its calibrator predicts the validation split); at that pace the default grid takes about 9 hours.

For each max length and row count, a fresh project (bench.common.make_project) with data.max_rows
= the row count ("full" = null: every usable row of ../shared/data/sst2/train.tsv), 1 baseline
epoch, and only the stages prepare, baseline and evaluate (which then measures the fp32 variant on
the fixed 872-row dev sample). Training rows are the prepare stage's own count (about 0.9 x rows:
10% goes to validation, and rows found in the dev sample are dropped first).

Each point records `lowbit_commit`, the code that measured it (points kept by --add-to may be older).
Per stage:
- stage_seconds: the stage's own figure; wall_seconds: its process, interpreter start-up included;
- process_peak_rss_bytes: ru_maxrss of the stage's process, read by a fresh wrapper process whose only
  child it is (RSS_WRAPPER; it covers the descendants the stage waited for, but evaluate's per-variant
  children belong to a forkserver it does not wait for: their figure comes from metrics/fp32.json);
- baseline: the training loop's own figures (train_peak_rss_bytes = its peak_rss_bytes, train_memory_bytes);
  evaluate: the fp32 child's (fp32_peak_rss_bytes, fp32_serving_memory_bytes, from metrics/fp32.json);
- peak_rss_bytes: the largest of the stage's figures above (plotted, and judged by `targets`).
Derived: seconds per 1k training rows, a least-squares line of stage_seconds vs training rows per
stage and length (slope, intercept, R²), rss_spread = (max − min) / min over the row counts.

Memory peaks at the longest padded batch (training's, and evaluation's: the evaluate stage also
predicts the validation split, 10% of the rows, to fit its calibrator), so each point also records
`longest_train_tokens` and `longest_val_tokens` (each split's longest example, tokenized at the
point's max length): a larger sample is more likely to hold a longer example, up to the max-length
cap or the corpus's longest. `rss_spread_same_longest` is a stage's spread over the points whose
longest example is as long as the largest sample's, where the row count is the only difference
left (null with fewer than two such points).

`--add-to FILE --rows` (no row counts) measures nothing and recomputes the derived figures, the
targets and the plot of an earlier result.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, SST2, code_version, emit, make_project, project_root, require_sst2, stage_result
from bench.quant import cpu_model

STAGES = ("prepare", "baseline", "evaluate")
R2_MIN = 0.98
RSS_SPREAD_MAX = 0.15
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["1000", "4000", "16000", "full"],
                        help='data.max_rows values; "full" = every row of train.tsv')
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128], help="model.max_length values")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--plot", type=Path, help="PNG path (default: scaling.png next to --out, or bench/results/)")
    parser.add_argument("--add-to", type=Path, metavar="JSON",
                        help="an earlier result of this benchmark on this CPU: its points are kept where this run does not "
                             "measure the same (max length, rows) again, and the fits, spreads and plot cover them all")
    args = parser.parse_args()
    try:
        args.rows = [None if r == "full" else int(r) for r in args.rows]
    except ValueError:
        parser.error(f"--rows: integers or 'full', got {args.rows}")
    if not args.rows and not args.add_to:
        parser.error("--rows with no row counts only recomputes an earlier result: give --add-to FILE")
    args.plot = args.plot or (args.out.parent if args.out else REPO / "bench" / "results") / "scaling.png"
    return args


# A fresh process per stage whose only child is the stage, so its RUSAGE_CHILDREN peak is the stage's
# own. A process spawned from the benchmark itself would not do: Linux carries the spawning process's
# high-water mark into the child's ru_maxrss across fork and exec (the benchmark holds torch: 300+ MiB;
# the wrapper, about 10 MiB).
RSS_WRAPPER = """import resource, subprocess, sys
code = subprocess.call(sys.argv[1], shell=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)"""


def measured_stage(root: Path, stage: str) -> dict:
    """Run the stage's dvc.yaml command as flows.dvc_stages.execute_stage does (own process, this
    interpreter first on PATH), inside RSS_WRAPPER."""
    from flows.dvc_stages import stage_command
    from flows.stage_host import stage_env

    env = stage_env({"PYTHONPATH": str(REPO), "CI": "1"})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, stage_command(root, stage)], cwd=root, env=env,
                          stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"stage {stage} failed (exit {done.returncode}) in {root}; its stderr is above")
    result = stage_result(root, stage)
    figures = {"stage_seconds": result["stage_seconds"], "wall_seconds": wall,
               "process_peak_rss_bytes": int(done.stdout.split()[-1]) * 1024}  # Linux reports KiB
    own_peak = 0  # the stage's own peak-RSS figure, where it reports one
    if stage == "baseline":
        figures |= {"train_peak_rss_bytes": result["peak_rss_bytes"], "train_memory_bytes": result["train_memory_bytes"],
                    "train_seconds": result["train_seconds"]}
        own_peak = result["peak_rss_bytes"]
    if stage == "evaluate":
        fp32 = json.loads((root / "metrics" / "fp32.json").read_text())["metrics"]
        figures |= {f"fp32_{k}": fp32[k] for k in ("peak_rss_bytes", "serving_memory_bytes") if k in fp32}
        own_peak = fp32.get("peak_rss_bytes", 0)
    figures["peak_rss_bytes"] = max(figures["process_peak_rss_bytes"], own_peak)
    return figures | ({"rows": result["rows"]} if stage == "prepare" else {})


def point_name(length: int, rows: int | None) -> str:
    return f"scaling-len{length}-rows{rows or 'full'}"


def run_point(length: int, rows: int | None) -> dict:
    root = make_project(point_name(length, rows), 0,
                        [f"data.max_rows={'null' if rows is None else rows}", f"model.max_length={length}"])
    stages = {}
    for stage in STAGES:
        print(f"scaling: max_length {length}, rows {rows or 'full'}: {stage}", file=sys.stderr, flush=True)
        stages[stage] = measured_stage(root, stage)
    split_rows = stages["prepare"].pop("rows")
    train_rows = split_rows["train"]
    for figures in stages.values():
        figures["seconds_per_1k_train_rows"] = figures["stage_seconds"] / (train_rows / 1000)
    return {"max_length": length, "max_rows": rows, "lowbit_commit": code_version(),
            "train_rows": train_rows, "split_rows": split_rows, "longest_train_tokens": longest_tokens(root, "train", length),
            "longest_val_tokens": longest_tokens(root, "val", length), "stages": stages}


def longest_tokens(root: Path, split: str, length: int) -> int:
    """Tokens of the split's longest example, truncated at `length` as training and evaluation truncate it."""
    import pandas as pd
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "models" / "baseline"))
    texts = pd.read_parquet(root / "data" / "prepared" / f"{split}.parquet")["text"].tolist()
    return max(len(ids) for ids in tokenizer(texts, truncation=True, max_length=length)["input_ids"])


def with_longest_val(point: dict) -> dict:
    """An earlier point without longest_val_tokens gets it from its project, where that is still on disk."""
    root = project_root(point_name(point["max_length"], point["max_rows"]), 0)
    if "longest_val_tokens" not in point and (root / "data" / "prepared" / "val.parquet").is_file():
        point["longest_val_tokens"] = longest_tokens(root, "val", point["max_length"])
    return point


def line_fit(x: list[float], y: list[float]) -> dict | None:
    """Least-squares y = slope·x + intercept and its R² (None with fewer than 2 distinct x)."""
    if len(set(x)) < 2:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = np.asarray(y) - (slope * np.asarray(x) + intercept)
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / total if total > 0 else 1.0
    return {"slope_seconds_per_1k_rows": float(slope) * 1000, "intercept_seconds": float(intercept), "r2": r2}


def derived(points: list[dict], lengths: list[int]) -> tuple[dict, dict]:
    fits, spreads, same_longest = {}, {}, {}
    for length in lengths:
        series = [p for p in points if p["max_length"] == length]
        x = [p["train_rows"] for p in series]
        fits[length] = {s: line_fit(x, [p["stages"][s]["stage_seconds"] for p in series]) for s in STAGES}
        rss = {s: [p["stages"][s]["peak_rss_bytes"] for p in series] for s in STAGES}
        spreads[length] = {s: (max(v) - min(v)) / min(v) for s, v in rss.items()}
        same_longest[length] = {stage: same_longest_spread(series, stage, key)
                                for stage, key in (("baseline", "longest_train_tokens"), ("evaluate", "longest_val_tokens"))}
    baseline_r2 = {length: fits[length]["baseline"] and fits[length]["baseline"]["r2"] for length in lengths}
    targets = {
        "time_linear": {
            "criterion": f"baseline stage_seconds vs train rows: least-squares line with R² >= {R2_MIN}, per max length",
            **{f"max_length_{n}": {"r2": r2, "met": r2 is not None and r2 >= R2_MIN} for n, r2 in baseline_r2.items()},
        },
        "rss_flat_within_15pct": {
            "criterion": f"per stage and max length: (max - min) / min of peak_rss_bytes over the row counts <= {RSS_SPREAD_MAX}",
            **{f"max_length_{n}": {s: {"rss_spread": v, "met": v <= RSS_SPREAD_MAX} for s, v in spreads[n].items()}
               for n in lengths},
        },
        "rss_flat_within_15pct_same_longest": {
            "criterion": f"peak_rss_bytes spread <= {RSS_SPREAD_MAX} over the points whose longest example is as long as "
                         "the largest sample's (the same longest batch; only the row count differs): training's longest "
                         "for baseline, the validation split's for evaluate (its calibrator predicts that split; the "
                         "test sample is the same at every point)",
            # met None: fewer than two points share the largest sample's longest example, nothing to judge
            **{f"max_length_{n}": {stage: {"rss_spread": v, "met": None if v is None else v <= RSS_SPREAD_MAX}
                                   for stage, v in by_stage.items()}
               for n, by_stage in same_longest.items()},
        },
    }
    return {"linear_fit_stage_seconds_vs_train_rows": {f"max_length_{n}": f for n, f in fits.items()},
            "rss_spread": {f"max_length_{n}": s for n, s in spreads.items()},
            "rss_spread_same_longest": {f"max_length_{n}": v for n, v in same_longest.items()}}, targets


def same_longest_spread(series: list[dict], stage: str, key: str) -> float | None:
    """The stage's peak-RSS spread over the points whose `key` (longest example) equals the largest sample's;
    None with fewer than two such points, or where the points lack the figure."""
    if any(key not in p for p in series):
        return None
    longest = max(series, key=lambda p: p["train_rows"])[key]
    same = [p["stages"][stage]["peak_rss_bytes"] for p in series if p[key] == longest]
    return (max(same) - min(same)) / min(same) if len(same) > 1 else None


def plot(points: list[dict], lengths: list[int], path: Path) -> None:
    from lowbit.tables import plt, save_png

    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for length in lengths:
        series = sorted((p for p in points if p["max_length"] == length), key=lambda p: p["train_rows"])
        x = [p["train_rows"] for p in series]
        for stage, marker in zip(STAGES, "os^"):
            label = f"{stage}, max_length {length}"
            time_ax.plot(x, [p["stages"][stage]["stage_seconds"] for p in series], marker=marker, label=label)
            rss_ax.plot(x, [p["stages"][stage]["peak_rss_bytes"] / MIB for p in series], marker=marker, label=label)
    for ax, ylabel in ((time_ax, "stage_seconds (s)"), (rss_ax, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("training rows")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    rss_ax.set_ylim(bottom=0)
    time_ax.legend(fontsize=7)
    fig.suptitle("lowbit on SST-2: stage time and peak RSS vs training rows")
    fig.tight_layout()
    save_png(fig, path)


def earlier_points(path: Path, hardware: dict) -> list[dict]:
    """The points of an earlier scaling result, refused when they come from another kind of CPU or thread count
    (a fit across machines would measure the machines)."""
    earlier = json.loads(path.read_text())
    if earlier.get("benchmark") != "scaling":
        sys.exit(f"--add-to {path}: not a result of bench.scaling (benchmark: {earlier.get('benchmark')!r})")
    mine = {"cpu": cpu_model(), "int8_kernels": hardware["int8_kernels"], "threads": torch.get_num_threads()}
    theirs = {"cpu": earlier.get("cpu"), "int8_kernels": earlier.get("hardware", {}).get("int8_kernels"),
              "threads": earlier.get("threads")}
    if mine != theirs:
        sys.exit(f"--add-to {path}: measured on {theirs}, this machine is {mine}; rerun every point here instead")
    return earlier["points"]


def main() -> None:
    args = parse_args()
    require_sst2()
    from lowbit.hardware import detect

    hardware = detect().describe()
    earlier = [with_longest_val(p) for p in earlier_points(args.add_to, hardware)] if args.add_to else []
    points = [run_point(length, rows) for length in args.lengths for rows in args.rows]
    measured = {(p["max_length"], p["max_rows"]) for p in points}
    points = sorted([*points, *(p for p in earlier if (p["max_length"], p["max_rows"]) not in measured)],
                    key=lambda p: (p["max_length"], p["train_rows"]))
    lengths = sorted({p["max_length"] for p in points})
    rows = sorted({p["max_rows"] for p in points}, key=lambda r: math.inf if r is None else r)
    figures, targets = derived(points, lengths)
    plot(points, lengths, args.plot)
    result = {
        "benchmark": "scaling",
        "data": (f"SST-2 (Socher et al., 2013) from {SST2}: train.tsv sampled with seed 0 to data.max_rows "
                 "(null = all), 10% held out for validation, 1 epoch; test: 872 dev rows (seed 0)"),
        "rows": ["full" if r is None else r for r in rows], "max_lengths": lengths, "stages": list(STAGES),
        "torch": torch.__version__, "cpu": cpu_model(), "hardware": hardware, "threads": torch.get_num_threads(),
        **({"points_added_to": str(args.add_to)} if earlier else {}),
        "plot": str(args.plot), "points": points, **figures, "targets": targets,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
