"""report: comparison table, accuracy-vs-memory Pareto plot and recommendation.

Run: python -m tasks.report   (dvc repro report; lowbit run)
Reads params: report.*; metrics/ (with the stages that failed, if any), models/ptq/sensitivity.json if present   Writes: reports/summary.md, reports/pareto.png, reports/reliability.png, reports/confusion.png, reports/summary.json
"""

from __future__ import annotations

from lowbit.config import Params
from lowbit.errors import LowbitError
from lowbit.io import read_json
from lowbit.report import build_summary, write_report
from tasks.plumbing import RESULT_FILE, Paths, StageClock, stage_main


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    records = {p.stem: read_json(p) for p in sorted(paths.metrics.glob("*.json")) if p.name != RESULT_FILE}
    if not records:
        raise LowbitError(f"no metrics under {paths.metrics}; run the evaluate stage first")
    sensitivity = paths.models / "ptq" / "sensitivity.json"
    evaluated = read_json(paths.metrics / RESULT_FILE)
    summary = build_summary(records, params.report.max_accuracy_drop,
                            read_json(sensitivity) if sensitivity.is_file() else None,
                            evaluated.get("missing", {}),  # stages that failed in this run
                            evaluated.get("hardware"))  # the machine the speed figures come from
    summary["stage_seconds"] = clock.seconds()
    write_report(summary, paths.reports)
    return {"recommendation": summary["recommendation"], "stage_seconds": summary["stage_seconds"]}


if __name__ == "__main__":
    stage_main("report", run)
