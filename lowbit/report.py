"""The comparison report: one table, an accuracy-vs-memory Pareto plot, a recommendation.

    summary = build_summary(records, max_accuracy_drop=1.0)
    write_report(summary, Path("reports"))

`accuracy_delta` = (variant accuracy − fp32 accuracy) × 100, in points. "Accuracy" is the records'
`quality_metric`: a classifier's accuracy, a causal LM's token_accuracy (lowbit/generation.py), whose
table has its own columns (GENERATIVE_COLUMNS) and a section of sample generations side by side.
The recommendation is the variant with the smallest `weight_bytes` (sizes within 1% are
a tie) whose accuracy is within `max_accuracy_drop` points of fp32; among ties the most
accurate, where a variant not significantly different from fp32 (the evaluate stage's
McNemar test) counts as exactly as accurate as fp32, then the fastest at batch 1.

Memory in the table's `serve MiB` column, on the Pareto plot and for the Pareto front is
`serving_memory_bytes`: the peak RSS of a process that loaded and evaluated only that variant,
minus the same for a process that loaded no model (tasks.evaluate), so it does not depend on the
order variants were evaluated in.

Stages that failed in this run are listed as missing, with their error; without the fp32
baseline there is no delta and no recommendation, and the report says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from lowbit.calibration import reliability_diagram
from lowbit.errors import LowbitError
from lowbit.io import atomic_write_text, write_json
from lowbit.tables import markdown_table, plt, save_png, sensitivity_table
from lowbit.variants import BASELINE

MIB = 1024 * 1024
MEMORY = "serving_memory_bytes"  # the Pareto plot's and front's memory axis


def build_summary(
    records: dict[str, dict], max_accuracy_drop: float, sensitivity: list[dict] | None = None,
    missing: dict[str, dict] | None = None, hardware: dict | None = None,
) -> dict:
    """`missing`: {stage: {"reason": error, "variants": names left out}} for stages that failed;
    `hardware`: the evaluate stage's machine (lowbit.hardware.describe_environment()), for the speed guide."""
    if not records:
        raise LowbitError("no evaluated variants: nothing to report")
    base = records[BASELINE]["metrics"] if BASELINE in records else None
    first = next(iter(records.values()))
    task, quality = first.get("task", "sequence_classification"), first.get("quality_metric", "accuracy")
    rows = []
    for variant in sorted(records, key=lambda v: (records[v].get("report_order", len(records)), v)):
        metrics = dict(records[variant]["metrics"])
        metrics["accuracy_delta"] = (metrics[quality] - base[quality]) * 100.0 if base else None
        notes = list(records[variant].get("notes", []))
        if "compile_seconds" in metrics:  # measured in evaluate: what the speed figures do not include
            notes.append(f"compiled in {metrics['compile_seconds']:.1f} s (its first call: one program serves every shape; not in p50 or samples/s)")
        rows.append({"variant": variant, "metrics": metrics, "notes": notes, "samples": records[variant].get("samples"),
                     "reliability": records[variant].get("reliability"), "per_class": records[variant].get("per_class")})
    front = pareto_front(rows, quality=quality)
    for row in rows:
        row["pareto"] = row["variant"] in front
    return {"task": task, "quality_metric": quality, "rows": rows, "sensitivity": sensitivity or [],
            "missing": missing or {}, "recommendation": recommendation(rows, base, max_accuracy_drop, quality),
            "hardware": hardware}


# What each x86 int8 kernel family does with an int8 GEMM (lowbit.hardware.int8_kernel_family).
INT8_KERNELS = {
    "amx": "AMX tiles: the int8 variants (dynamic, static, compiled) gain the most here",
    "vnni": "VNNI dot products: the int8 variants (dynamic, static, compiled) gain the most here",
    "avx2": "AVX2 pair products that saturate at int16: the int8 variants gain less than with VNNI or AMX",
    "generic": "no x86 int8 instructions: the int8 variants are not expected to be faster than FP32",
}


def speed_guide(hardware: dict | None) -> str | None:
    """Which kinds of variant this machine runs fast, from the capabilities the evaluate stage recorded
    (lowbit.hardware.Capabilities.describe()): the speed columns hold for this kind of machine only.
    None for results that predate the record. A rule of thumb per capability, not a measurement;
    bench/quant.py measures each CPU kind (README, Performance)."""
    if not hardware:
        return None
    kernels = hardware.get("int8_kernels", "generic")
    flags = ", ".join(hardware.get("cpu_flags", [])) or "none of those lowbit looks for"
    if hardware.get("cpu_bf16_matmul"):
        bf16 = ("bf16 matmuls are native here, so `half_bf16` and bitsandbytes' NF4 (its CPU kernel computes in bf16) "
                "can beat FP32, while LLM.int8 (`ptq_int8_bnb`) saves memory, not time, on a CPU")
    else:
        bf16 = ("this CPU has no native bf16 matmul, so `half_bf16` and LLM.int8 (`ptq_int8_bnb`, its CPU kernel computes "
                "in bf16) run emulated, several times slower than FP32, and NF4 computes in fp32 here, dequantizing its "
                "weights at every call (lowbit.hardware.nf4_compute_dtype): they save memory, not time")
    lines = [f"Speed figures are for this kind of machine: {hardware.get('cores', '?')} cores, CPU flags {flags}. "
             f"int8 kernels: {INT8_KERNELS.get(kernels, INT8_KERNELS['generic'])}; {bf16}; `half_fp16` has no FP16 "
             "arithmetic on x86 CPUs before AVX512-FP16/AMX-FP16 and runs slowest."]
    if hardware.get("cuda"):
        lines.append("A CUDA device was present: variants placed on it (bitsandbytes, half precision) were timed there.")
    return " ".join(lines)


def recommendation(rows: list[dict], base: dict | None, max_accuracy_drop: float, quality: str = "accuracy") -> dict:
    rule = (f"smallest weight_bytes (±{SAME_SIZE:.0%}) within {max_accuracy_drop:g} {quality} points of {BASELINE}, "
            "then the most accurate (a difference from fp32 that is not significant counts as none), then the fastest")
    if base is None:
        return {"variant": None, "rule": rule, "why_none": f"no {BASELINE} baseline in this run to compare against"}
    best, tied = recommend(rows, max_accuracy_drop, base[quality], quality)
    return {"variant": best["variant"], "rule": rule,
            "weight_ratio_vs_fp32": best["metrics"]["weight_bytes"] / base["weight_bytes"],
            "accuracy_delta": best["metrics"]["accuracy_delta"],
            "tied_with_fp32": [r["variant"] for r in tied if not_significant(r)]}


SAME_SIZE = 0.01  # sizes this close are a tie: a few hundred bytes of scales should not outrank accuracy


def not_significant(row: dict) -> bool:
    """The paired test against fp32 (evaluate stage) found no significant difference."""
    return row["metrics"].get("accuracy_delta_significant") == 0.0


def recommend(rows: list[dict], max_accuracy_drop: float, base_accuracy: float,
              quality: str = "accuracy") -> tuple[dict, list[dict]]:
    """(the recommended row, the rows tied with it on size). Among those, a variant whose accuracy
    is not significantly different from fp32's ranks as exactly as accurate as fp32: a fraction of
    a point on a few hundred rows is noise, so it must not decide, and the latency does."""
    eligible = [r for r in rows if r["metrics"]["accuracy_delta"] >= -max_accuracy_drop]
    smallest = min(r["metrics"]["weight_bytes"] for r in eligible)
    tied = [r for r in eligible if r["metrics"]["weight_bytes"] <= smallest * (1 + SAME_SIZE)]
    credited = lambda r: base_accuracy if not_significant(r) else r["metrics"][quality]  # noqa: E731
    return max(tied, key=lambda r: (credited(r), -r["metrics"]["latency_ms_p50"])), tied


def pareto_front(rows: list[dict], memory: str = MEMORY, quality: str = "accuracy") -> set[str]:
    """Variants no other variant beats on both `quality` (higher) and the `memory` metric (lower)."""
    def dominated(a: dict) -> bool:
        ma = a["metrics"]
        return any(
            mb[quality] >= ma[quality] and mb[memory] <= ma[memory]
            and (mb[quality] > ma[quality] or mb[memory] < ma[memory])
            for mb in (b["metrics"] for b in rows)
        )
    return {r["variant"] for r in rows if not dominated(r)}


COLUMNS = [  # (header, metric, format); accuracy and Δacc have cells of their own
    ("f1_macro", "f1_macro", "{:.4f}"), ("ece → cal", "ece", "ece"), ("weight MiB", "weight_bytes", "mib"),
    ("disk MiB", "disk_bytes", "mib"), ("serve MiB", MEMORY, "mib"), ("bits/param", "bits_per_param", "{:.2f}"),
    ("q bits", "quantized_bits_per_param", "{:.2f}"), ("p50 ms", "latency_ms_p50", "{:.2f}"),
    ("p95 ms", "latency_ms_p95", "{:.2f}"), ("samples/s", "throughput_samples_s", "{:.1f}"),
]


# A causal LM's columns: quality from teacher forcing and from the generated sample, then cost.
GENERATIVE_COLUMNS = [
    ("perplexity", "perplexity", "{:.3f}"), ("chrF [95% CI]", "chrf", "chrf"), ("ROUGE-L", "rouge_l", "{:.3f}"),
    ("exact", "exact_match", "{:.3f}"), ("ends turn", "eot_share", "{:.2f}"), ("weight MiB", "weight_bytes", "mib"),
    ("disk MiB", "disk_bytes", "mib"), ("serve MiB", MEMORY, "mib"), ("bits/param", "bits_per_param", "{:.2f}"),
    ("ms/token p50", "latency_ms_p50", "{:.1f}"), ("tokens/s", "tokens_s", "{:.1f}"),
]


def variants_table(summary: dict) -> str:
    quality = summary.get("quality_metric", "accuracy")
    kind = task_report(summary)
    columns = kind.columns
    header = ["variant", kind.quality_header, kind.delta_header, *(h for h, _, _ in columns), "pareto"]
    rows = [[row["variant"], accuracy_cell(row["metrics"], quality), delta_cell(row["metrics"]),
             *(_fmt(row["metrics"].get(key), fmt, row["metrics"]) for _, key, fmt in columns), "*" if row["pareto"] else ""]
            for row in summary["rows"]]
    return markdown_table(header, rows)


def accuracy_cell(metrics: dict, quality: str = "accuracy") -> str:
    if f"{quality}_ci_low" not in metrics:
        return f"{metrics[quality]:.4f}"
    return f"{metrics[quality]:.4f} [{metrics[f'{quality}_ci_low']:.3f}, {metrics[f'{quality}_ci_high']:.3f}]"


def delta_cell(metrics: dict) -> str:
    """Δ points vs fp32, † where McNemar's test finds the difference significant."""
    if metrics.get("accuracy_delta") is None:
        return "–"
    return f"{metrics['accuracy_delta']:+.2f}" + ("†" if metrics.get("accuracy_delta_significant") == 1.0 else "")


def _fmt(value, fmt: str, metrics: dict | None = None) -> str:
    if value is None:
        return "–"
    if fmt == "mib":
        return f"{value / MIB:.1f}"
    if fmt == "chrf":
        interval = metrics or {}
        return f"{value:.1f}" + (f" [{interval['chrf_ci_low']:.1f}, {interval['chrf_ci_high']:.1f}]" if "chrf_ci_low" in interval else "")
    if fmt == "ece":
        after = (metrics or {}).get("ece_calibrated")
        return f"{value:.4f}" + (f" → {after:.4f}" if after is not None else "")
    return fmt.format(value)


def recommendation_line(rec: dict) -> str:
    if rec["variant"] is None:
        return f"**No recommendation**: {rec['why_none']}."
    line = (f"**Recommended: {rec['variant']}** — {rec['rule']}: {rec['weight_ratio_vs_fp32']:.1%} of fp32 weight bytes, "
            f"{rec['accuracy_delta']:+.2f} accuracy points.")
    if len(rec.get("tied_with_fp32", [])) > 1:
        line += (f" Of the same size and not significantly different from fp32 (so ranked as equally accurate, "
                 f"then by latency): {', '.join(rec['tied_with_fp32'])}.")
    return line


def missing_lines(missing: dict[str, dict]) -> list[str]:
    """One line per stage that failed: what is left out of the table, and the stage's error."""
    lines = []
    for stage, info in missing.items():
        stale = f" (earlier models left out: {', '.join(info['variants'])})" if info["variants"] else ""
        lines.append(f"- **{stage}**{stale}: {info['reason']}")
    return lines


CLASSIFIER_LEGEND = (
    "accuracy [95% CI]: percentile interval of a seeded bootstrap over test rows. "
    "Δacc pts = (accuracy − fp32 accuracy) × 100, on the same rows; † = significant by McNemar's exact test "
    "(evaluate.significance_level). ece → cal: expected calibration error before → after the calibration fitted "
    "on the validation split (evaluate.calibration). bits/param = 8 × weight_bytes / total_params (derived). "
    "q bits = storage bits per quantized weight, scales included. "
    "serve MiB = peak RSS of a process that loaded and evaluated only this variant − the same for one that "
    "loaded no model (derived; order-independent). "
    "p50/p95 ms: batch of 1, each test text's fastest of evaluate.latency_rounds passes (derived: pauses other "
    "processes cause are left out); samples/s: evaluation batch. pareto: no variant is both more accurate and "
    "smaller to serve."
)
GENERATIVE_LEGEND = (
    "token acc [95% CI]: share of the test targets' tokens (and end-of-turn token) the model ranks first, teacher-forced; "
    "interval: seeded bootstrap over test examples. Δtok-acc pts = (token acc − fp32's) × 100. perplexity = exp(mean NLL "
    "per target token) (derived). chrF (0-100, with its bootstrap interval), ROUGE-L and exact: greedy answers to the "
    "first evaluate.generation_samples test prompts against the references; ends turn: share of those answers that "
    "ended with the end-of-turn token within evaluate.max_new_tokens. zero_shot: the pretrained model, not fine-tuned. "
    "serve MiB = peak RSS of a process that loaded and evaluated only this variant − the same for one that loaded no "
    "model (derived). ms/token p50: a prompt's generation time over its new tokens (batch of 1, prefill included); "
    "tokens/s: all new tokens over all generation time. pareto: no variant has both higher token accuracy and less "
    "serving memory."
)


def sample_lines(rows: list[dict]) -> list[str]:
    """The test prompts whose generations the records keep (lowbit.generation.SAMPLES_IN_REPORT), each with its
    reference and every variant's answer side by side."""
    with_samples = [r for r in rows if r.get("samples")]
    if not with_samples:
        return []
    lines = ["", "Sample generations (greedy; the first test prompts; … = cut at evaluate.max_new_tokens):"]
    for i, sample in enumerate(with_samples[0]["samples"]):
        answers = [[r["variant"], one_line(r["samples"][i]["generation"]) + ("" if r["samples"][i]["ended"] else " …")]
                   for r in with_samples if len(r["samples"]) > i]
        lines += ["", f"**Prompt {i + 1}**: {one_line(sample['prompt'])}", "",
                  markdown_table(["variant", "answer"], [["reference", one_line(sample["reference"])], *answers])]
    return lines


def one_line(text: str, limit: int = 160) -> str:
    """A table cell: whitespace folded, pipes escaped, long text cut."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def markdown_report(summary: dict) -> str:
    notes = [f"- {row['variant']}: {note}" for row in summary["rows"] for note in row["notes"]]
    parts = ["# lowbit report", ""]
    if summary.get("missing"):
        parts += ["**Incomplete run**: these stages failed, so their variants are not in the table:",
                  *missing_lines(summary["missing"]), ""]
    kind = task_report(summary)
    parts += [variants_table(summary), "", recommendation_line(summary["recommendation"]), "", kind.legend, "",
              kind.figures]
    guide = speed_guide(summary.get("hardware"))
    parts += ["", guide] if guide else []
    parts += sample_lines(summary["rows"])
    if summary.get("sensitivity"):
        parts += ["", "Most quantization-sensitive layers (one layer int8 at a time, validation split; "
                  "candidates for ptq.skip_modules):", "", sensitivity_table(summary["sensitivity"][:10])]
    if notes:
        parts += ["", "Notes:", *notes]
    return "\n".join(parts) + "\n"


def label_groups(points: list[tuple[str, float, float]]) -> list[tuple[list[str], float, float]]:
    """Variants whose labels would overprint share one label, a name per line, at the most accurate
    point of the group: a point joins a group within 3% of the x span whose label (a line of text is
    about 1/25 of the y span) reaches down to within a line of it."""
    xs, ys = [x for _, x, _ in points], [y for _, _, y in points]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    line = y_span / 25
    groups: list[tuple[list[str], float, float]] = []
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        near = next((g for g in groups if abs(g[1] - x) < 0.03 * x_span and y > g[2] - (len(g[0]) + 1) * line), None)
        if near:
            near[0].append(name)
        else:
            groups.append(([name], x, y))
    return groups


def pareto_plot(summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    quality = summary.get("quality_metric", "accuracy")
    points = [(r["variant"], r["metrics"][MEMORY] / MIB, r["metrics"][quality]) for r in summary["rows"]]
    for row, (_, x, y) in zip(summary["rows"], points):
        on_front = row["pareto"]
        ax.scatter(x, y, color="tab:red" if on_front else "tab:blue", zorder=4 if on_front else 3)
    for names, x, y in label_groups(points):
        ax.annotate("\n".join(names), (x, y), textcoords="offset points", xytext=(5, 2), fontsize=7, va="top")
    front = sorted((r["metrics"][MEMORY] / MIB, r["metrics"][quality]) for r in summary["rows"] if r["pareto"])
    ax.plot(*zip(*front), color="tab:red", linestyle="--", linewidth=1, label="Pareto front")
    ax.set_xlabel("serving_memory_bytes (MiB: peak RSS of the variant alone − import floor)")
    ax.set_ylabel(f"test {quality}")
    ax.set_title(f"lowbit: {quality} vs memory")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_png(fig, path)


def confusion_plot(summary: dict, path: Path) -> None:
    """One confusion matrix per variant (rows: true label, columns: predicted), shares of each true label:
    a quantized model that collapses one class shows as an empty column even when accuracy holds."""
    rows = [r for r in summary["rows"] if r.get("per_class")]
    columns = min(4, len(rows))
    fig, axes = plt.subplots((len(rows) + columns - 1) // columns, columns, figsize=(3 * columns, 2.8 * ((len(rows) + columns - 1) // columns)),
                             squeeze=False)
    for ax, row in zip(axes.flat, rows):
        counts = np.array(row["per_class"]["confusion_matrix"], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        names = row["per_class"]["labels"]
        ax.set_xticks(range(len(names)), names, fontsize=6, rotation=45)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        for (i, j), share in np.ndenumerate(shares):
            ax.text(j, i, f"{share:.2f}", ha="center", va="center", fontsize=6, color="white" if share > 0.5 else "black")
        ax.set_title(row["variant"], fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("lowbit: confusion per variant (rows: true label; share of each row)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path)


def generation_outcomes_plot(summary: dict, path: Path) -> None:
    """A causal LM has no classes to confuse: per variant, the share of sample answers that match the
    reference exactly, that end their turn, and their mean ROUGE-L and chrF/100, side by side."""
    series = [("exact", "exact_match", 1.0), ("ends turn", "eot_share", 1.0), ("ROUGE-L", "rouge_l", 1.0),
              ("chrF / 100", "chrf", 100.0)]
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.6))
    width = 0.8 / len(series)
    for k, (label, key, scale) in enumerate(series):
        ax.bar([i + k * width for i in range(len(rows))], [r["metrics"][key] / scale for r in rows], width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["variant"] for r in rows], rotation=45, ha="right",
                  fontsize=7)
    ax.set(ylim=(0, 1), ylabel="share / score", title="lowbit: outcomes of the sample generations per variant")
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    save_png(fig, path)


class TaskReport(NamedTuple):
    """What a report shows for one task type (the records' `task`): the table, its legend, the figures."""

    quality_header: str
    delta_header: str
    columns: list[tuple[str, str, str]]
    legend: str
    figures: str
    outcomes_plot: Callable[[dict, Path], None]  # confusion.png: classes confused, or generation outcomes


TASK_REPORTS = {
    "sequence_classification": TaskReport(
        "accuracy [95% CI]", "Δacc pts", COLUMNS, CLASSIFIER_LEGEND,
        "Figures: pareto.png (accuracy vs memory), reliability.png (confidence vs accuracy per variant, "
        "before and after calibration), confusion.png (per-class confusion per variant).", confusion_plot),
    "causal_lm": TaskReport(
        "token acc [95% CI]", "Δtok-acc pts", GENERATIVE_COLUMNS, GENERATIVE_LEGEND,
        "Figures: pareto.png (token accuracy vs memory), reliability.png (next-token confidence vs accuracy "
        "per variant, target tokens), confusion.png (outcomes of the sample generations per variant).",
        generation_outcomes_plot),
}


def task_report(summary: dict) -> TaskReport:
    return TASK_REPORTS[summary.get("task", "sequence_classification")]


def write_report(summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    pareto_plot(summary, out_dir / "pareto.png")
    curves = {r["variant"]: r["reliability"] for r in summary["rows"] if r.get("reliability")}
    if not curves:  # dvc.yaml declares both figures: never leave an earlier run's in place
        raise LowbitError("the metrics hold no reliability bins or per-class counts; rerun the evaluate stage")
    reliability_diagram(curves, out_dir / "reliability.png")
    task_report(summary).outcomes_plot(summary, out_dir / "confusion.png")
    atomic_write_text(out_dir / "summary.md", markdown_report(summary))
    write_json(out_dir / "summary.json", summary)
