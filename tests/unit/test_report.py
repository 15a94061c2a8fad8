import numpy as np
import pytest

from lowbit.calibration import per_class_report, reliability_bins

from lowbit.errors import LowbitError
from lowbit.report import build_summary, label_groups, markdown_report, pareto_front, speed_guide, write_report


def record(accuracy, weight_bytes):
    return {"metrics": {"accuracy": accuracy, "weight_bytes": weight_bytes, "serving_memory_bytes": weight_bytes + 50,
                        "f1_macro": accuracy, "ece": 0.05,
                        "disk_bytes": weight_bytes, "bits_per_param": 8 * weight_bytes / 100,
                        "latency_ms_p50": 1.0, "latency_ms_p95": 2.0, "throughput_samples_s": 10.0}}


RECORDS = {
    "fp32": record(0.900, 400),
    "ptq_int8_dynamic": record(0.895, 120),     # within 1 point, smaller: recommended
    "ptq_nf4": record(0.870, 70),               # smallest but 3 points down
    "half_fp16": record(0.890, 200),            # dominated by ptq_int8_dynamic
}


def test_accuracy_delta_in_points_and_report_order():
    summary = build_summary(RECORDS, max_accuracy_drop=1.0)
    rows = {r["variant"]: r["metrics"] for r in summary["rows"]}
    assert rows["ptq_nf4"]["accuracy_delta"] == pytest.approx(-3.0)
    assert [r["variant"] for r in summary["rows"]] == ["fp32", "half_fp16", "ptq_int8_dynamic", "ptq_nf4"]


def test_pareto_front_excludes_dominated_variants():
    rows = build_summary(RECORDS, 1.0)["rows"]
    assert pareto_front(rows) == {"fp32", "ptq_int8_dynamic", "ptq_nf4"}


def test_pareto_front_and_table_use_serving_memory_not_weight_bytes():
    """NF4 holds fewer weight bytes but, dequantizing per call, needs more memory to serve than int8:
    on the serving axis it is dominated (less accurate and larger)."""
    records = {name: {"metrics": dict(rec["metrics"])} for name, rec in RECORDS.items()}
    serving_mib = {"fp32": 400, "half_fp16": 200, "ptq_int8_dynamic": 150, "ptq_nf4": 300}
    for name, mib in serving_mib.items():
        records[name]["metrics"]["serving_memory_bytes"] = mib * 1024 * 1024
    summary = build_summary(records, 1.0)
    assert pareto_front(summary["rows"]) == {"fp32", "ptq_int8_dynamic"}
    assert pareto_front(summary["rows"], memory="weight_bytes") == {"fp32", "ptq_int8_dynamic", "ptq_nf4"}
    table = markdown_report(summary)
    assert "serve MiB" in table and "| 300.0 |" in table and "| 150.0 |" in table


def test_recommendation_is_smallest_within_the_allowed_drop():
    assert build_summary(RECORDS, 1.0)["recommendation"]["variant"] == "ptq_int8_dynamic"
    assert build_summary(RECORDS, 5.0)["recommendation"]["variant"] == "ptq_nf4"
    rec = build_summary(RECORDS, 0.0)["recommendation"]
    assert rec["variant"] == "fp32" and rec["weight_ratio_vs_fp32"] == 1.0


def test_report_without_baseline_has_no_deltas_and_says_why_there_is_no_recommendation():
    missing = {"baseline": {"reason": "stage baseline failed (exit 1): MemoryError", "variants": ["fp32"]}}
    summary = build_summary({"lora": RECORDS["ptq_nf4"]}, 1.0, missing=missing)
    assert summary["rows"][0]["metrics"]["accuracy_delta"] is None
    assert summary["recommendation"]["variant"] is None
    text = markdown_report(summary)
    assert "**No recommendation**: no fp32 baseline in this run to compare against." in text
    assert "- **baseline** (earlier models left out: fp32): stage baseline failed (exit 1): MemoryError" in text
    with pytest.raises(LowbitError, match="no evaluated variants"):
        build_summary({}, 1.0)


def test_failed_stages_are_listed_above_the_table_of_what_exists():
    missing = {"qlora": {"reason": "stage qlora failed (exit 1): RuntimeError: in-place", "variants": []}}
    summary = build_summary(RECORDS, 1.0, missing=missing)
    text = markdown_report(summary)
    assert text.index("**Incomplete run**") < text.index("| variant |")
    assert "- **qlora**: stage qlora failed (exit 1): RuntimeError: in-place" in text
    assert summary["recommendation"]["variant"] == "ptq_int8_dynamic"  # chosen among the variants that exist
    assert "Incomplete run" not in markdown_report(build_summary(RECORDS, 1.0))


def with_evaluation_details(records: dict) -> dict:
    """Records as the evaluate stage writes them: reliability bins and the per-class view too."""
    rng = np.random.default_rng(0)
    probabilities, labels = rng.dirichlet([1, 1, 1], size=60), rng.integers(0, 3, size=60)
    details = {"reliability": {"before": reliability_bins(probabilities, labels)},
               "per_class": per_class_report(probabilities, labels, ["neg", "neu", "pos"])}
    return {name: rec | details for name, rec in records.items()}


def test_written_report_has_table_plots_and_json(tmp_path):
    summary = build_summary(with_evaluation_details(RECORDS), 1.0)
    write_report(summary, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| ptq_int8_dynamic | 0.8950 | -0.50 |" in text
    assert "**Recommended: ptq_int8_dynamic**" in text and "30.0% of fp32 weight bytes" in text
    for figure in ("pareto.png", "reliability.png", "confusion.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_report(summary) == text


def test_a_report_without_reliability_data_refuses_rather_than_keeping_old_figures(tmp_path):
    with pytest.raises(LowbitError, match="no reliability bins"):
        write_report(build_summary(RECORDS, 1.0), tmp_path)


def test_near_equal_sizes_tie_and_the_more_accurate_then_faster_variant_wins():
    records = {
        "fp32": record(0.900, 400_000),
        "ptq_int8_weight_only": record(0.899, 100_000),
        "ptq_int8_static_percentile": record(0.905, 100_600),   # 0.6% larger: its activation scales
        "ptq_int8_static_entropy": record(0.905, 100_500),
    }
    records["ptq_int8_static_entropy"]["metrics"]["latency_ms_p50"] = 0.5
    assert build_summary(records, 1.0)["recommendation"]["variant"] == "ptq_int8_static_entropy"
    records["ptq_int8_static_percentile"]["metrics"]["weight_bytes"] = 102_000  # 2% larger: no longer a tie
    records["ptq_int8_static_entropy"]["metrics"]["weight_bytes"] = 102_000
    assert build_summary(records, 1.0)["recommendation"]["variant"] == "ptq_int8_weight_only"


def test_compile_time_is_reported_as_a_note_since_speed_figures_exclude_it():
    compiled = record(0.899, 100)
    compiled["metrics"]["compile_seconds"] = 41.26
    text = markdown_report(build_summary(RECORDS | {"ptq_int8_static_compiled": compiled}, 1.0))
    assert "- ptq_int8_static_compiled: compiled in 41.3 s (its first call: one program serves every shape; not in p50 or samples/s)" in text


def test_plot_labels_that_would_overprint_share_one_label_most_accurate_first():
    points = [("fp32", 86.7, 0.918), ("ptq_int8_dynamic", 22.0, 0.917), ("ptq_int8_weight_only", 22.0, 0.918),
              ("ptq_int8_static_minmax", 22.0, 0.877), ("half_bf16", 43.3, 0.918)]
    groups = label_groups(points)
    assert groups[1] == (["ptq_int8_weight_only", "ptq_int8_dynamic"], 22.0, 0.918)
    assert sorted(len(g[0]) for g in groups) == [1, 1, 1, 2]  # minmax is 4 points lower: its own label


def with_test(rec, delta, significant, latency, ci=(0.88, 0.92)):
    rec = {"metrics": dict(rec["metrics"])}
    rec["metrics"] |= {"accuracy_delta_significant": float(significant), "latency_ms_p50": latency,
                       "accuracy_ci_low": ci[0], "accuracy_ci_high": ci[1]}
    return rec


def test_variants_not_significantly_different_from_fp32_tie_on_accuracy_and_latency_decides():
    records = {
        "fp32": with_test(record(0.900, 400), 0, False, 10.0),
        "ptq_int8_static_percentile": with_test(record(0.903, 120), 0.3, False, 9.0),  # one row better: noise
        "ptq_int8_dynamic": with_test(record(0.898, 120), -0.2, False, 6.0),            # faster, equally accurate
        "ptq_int8_weight_only": with_test(record(0.899, 121), -0.1, False, 12.0),
    }
    summary = build_summary(records, 1.0)
    rec = summary["recommendation"]
    assert rec["variant"] == "ptq_int8_dynamic"
    assert set(rec["tied_with_fp32"]) == {"ptq_int8_static_percentile", "ptq_int8_dynamic", "ptq_int8_weight_only"}
    text = markdown_report(summary)
    assert "not significantly different from fp32 (so ranked as equally accurate, then by latency)" in text
    # a significant gain is a real gain: it wins on accuracy
    records["ptq_int8_static_percentile"] = with_test(record(0.930, 120), 3.0, True, 9.0)
    assert build_summary(records, 1.0)["recommendation"]["variant"] == "ptq_int8_static_percentile"


def test_table_shows_the_interval_the_significance_mark_and_calibrated_ece():
    records = {"fp32": with_test(record(0.900, 400), 0, False, 1.0, (0.871, 0.925)),
               "ptq_nf4": with_test(record(0.850, 70), -5.0, True, 1.0)}
    records["ptq_nf4"]["metrics"]["ece_calibrated"] = 0.0123
    table = markdown_report(build_summary(records, 10.0))
    assert "| fp32 | 0.9000 [0.871, 0.925] | +0.00 |" in table
    assert "| ptq_nf4 | 0.8500 [0.880, 0.920] | -5.00† |" in table
    assert "0.0500 → 0.0123" in table


def hardware(kernels: str, bf16: bool, cuda: bool = False) -> dict:
    flags = {"amx": ["amx_int8", "avx512_vnni"], "vnni": ["avx512_vnni"], "avx2": ["avx2"], "generic": []}[kernels]
    return {"cores": 2, "cpu_flags": flags, "int8_kernels": kernels, "cpu_bf16_matmul": bf16, "cuda": cuda}


@pytest.mark.parametrize("kernels, gains", [("amx", "AMX tiles"), ("vnni", "VNNI dot products"),
                                            ("avx2", "saturate at int16"), ("generic", "not expected to be faster")])
def test_speed_guide_names_what_this_cpu_kind_runs_fast(kernels, gains):
    guide = speed_guide(hardware(kernels, bf16=False))
    assert gains in guide
    assert "no native bf16 matmul" in guide and "save memory, not time" in guide
    assert "NF4 computes in fp32 here" in guide  # the dtype lowbit.hardware.nf4_compute_dtype picks without bf16
    assert "half_fp16" in guide and "CUDA" not in guide


def test_speed_guide_with_native_bf16_and_cuda_and_without_a_record():
    guide = speed_guide(hardware("vnni", bf16=True, cuda=True))
    assert "bf16 matmuls are native here" in guide and "NF4 (its CPU kernel computes in bf16) can beat FP32" in guide
    assert "emulated" not in guide and "LLM.int8 (`ptq_int8_bnb`) saves memory, not time" in guide  # 0.79x FP32 even here
    assert "CUDA device was present" in guide
    assert speed_guide(None) is None  # results from before the evaluate stage recorded its machine
    assert "Speed figures are for" not in markdown_report(build_summary(RECORDS, 1.0))
    text = markdown_report(build_summary(RECORDS, 1.0, hardware=hardware("avx2", bf16=False)))
    assert "CPU flags avx2" in text and "saturate at int16" in text
