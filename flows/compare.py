"""`lowbit compare`: one table across pipeline runs and their variants, read from MLflow.

    lowbit compare                                   the 2 latest finished pipeline runs
    lowbit compare --last 5 --tag lowbit.git_dirty=false
    lowbit compare --run 3f2a91c0 --run 77b1e0d2 --strict
    lowbit compare --since 2025-03-01 --until 2025-03-31 --variant 'ptq_*'

One row per (pipeline run, variant), grouped by variant so that the same variant from each
run sits together. The params that differ between the selected runs become columns: they are
why the runs differ. Every row's test-split digest is checked against the first selected run's
(the newest with --last, the first --run given): a row evaluated on other test rows is flagged,
because its accuracy is not comparable, and --strict refuses to compare at all.

Writes <out>/comparison.csv (raw numbers, full run ids), <out>/comparison.md (what is printed)
and <out>/pareto.png (accuracy vs weight bytes, one colour and marker per run, each run's front).

Only the fetching touches MLflow; the table is built by plain functions of `PipelineRun`s.
This module is imported by the `lowbit` command line to build its parser, so it imports MLflow,
pandas and matplotlib only inside the functions that use them: the other commands should not
pay their ~2 s import time.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import math
import re
import string
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from flows.mlflow_store import VariantRun, all_runs, open_store, store_errors, variant_runs
from lowbit.errors import LowbitError

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from tasks.plumbing import Paths

DEFAULT_LAST = 2  # "what changed since the previous run" is the common question
DEFAULT_OUT = "reports/compare"
STATUSES = ("FINISHED", "FAILED", "RUNNING", "KILLED", "any")
SHORT_ID = 8
MIB = 1024 * 1024

# Figures copied from each variant run into the CSV (those a run lacks are left empty).
METRICS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "accuracy_delta", "accuracy_delta_significant",
           "f1_macro", "ece", "weight_bytes", "disk_bytes", "bits_per_param", "latency_ms_p50",
           "throughput_samples_s", "peak_rss_bytes")


@dataclass(frozen=True)
class PipelineRun:
    """A parent run as fetched: flattened params, tags, and its variant runs in logging order."""

    run_id: str
    experiment: str
    start_ms: int
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    variants: list[VariantRun]

    @property
    def short(self) -> str:
        return self.run_id[:SHORT_ID]

    @property
    def test_digest(self) -> str | None:
        return self.tags.get("lowbit.test_digest") or None


@dataclass(frozen=True)
class Selection:
    experiment: str
    run_ids: tuple[str, ...] = ()
    last: int | None = None  # None: all runs that pass the filters
    tags: dict[str, str] = field(default_factory=dict)
    since_ms: int | None = None  # start_time >= since_ms
    until_ms: int | None = None  # start_time < until_ms
    status: str = "FINISHED"
    variants: tuple[str, ...] = ()


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("One table across pipeline runs and their variants from MLflow: the params that differ, "
                          "accuracy with its interval, size and speed; rows on another test split than the first "
                          "run's are flagged (refused with --strict). Writes CSV, Markdown and a Pareto plot.")
    pick = parser.add_argument_group("which runs (pipeline runs of one experiment)")
    pick.add_argument("--last", type=int, metavar="N",
                      help=f"the N most recent pipeline runs (default {DEFAULT_LAST}; "
                           "with --since/--until, every run in the range)")
    pick.add_argument("--run", action="append", default=[], metavar="ID", dest="runs",
                      help="a pipeline run id, full or a unique prefix (repeat for more; the first is the reference)")
    pick.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: tracking.experiment in params.yaml)")
    pick.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", dest="tags",
                      help="only runs whose parent run has this tag value, e.g. lowbit.git_dirty=false (repeatable)")
    pick.add_argument("--since", metavar="DATE", help="runs started on or after this ISO date/time (UTC unless it has an offset)")
    pick.add_argument("--until", metavar="DATE", help="runs started up to this ISO date/time; a date includes its whole day")
    pick.add_argument("--status", choices=STATUSES, help="run status to keep (default FINISHED; any = all)")
    parser.add_argument("--variant", action="append", default=[], metavar="GLOB", dest="variants",
                        help="only variants matching this glob, e.g. 'ptq_*' (repeatable)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse when any row's test split differs from the first run's, instead of flagging it")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where comparison.csv, comparison.md and pareto.png go (default {DEFAULT_OUT})")


def compare_command(args: argparse.Namespace, paths: Paths) -> int:
    from flows.tracking import resolve_uri

    tracking = tracking_params(paths.params)
    selection = selection_from_args(args, tracking.experiment)
    uri = resolve_uri(tracking.uri, paths.root)
    runs = fetch_runs(uri, selection)
    frame = build_frame(runs, selection.variants)
    if args.strict:
        refuse_incomparable(frame, runs)
    out = paths.root / args.out  # an absolute --out stays as given
    text = comparison_markdown(frame, runs, f"experiment `{selection.experiment}` in {uri}")
    write_outputs(frame, text, out)
    print(text)
    print(f"wrote {out / 'comparison.csv'}, {out / 'comparison.md'}, {out / 'pareto.png'}")
    return 0


def tracking_params(path: Path):
    """Only params.yaml's tracking section: past runs can be compared while other params are being
    edited, and validating ptq.schemes imports torch (seconds) for nothing here."""
    from pydantic import ValidationError

    from lowbit.config import TrackingParams, describe_error, read_yaml_mapping

    raw = read_yaml_mapping(path)
    try:
        return TrackingParams.model_validate(raw.get("tracking"))
    except ValidationError as err:
        lines = [describe_error({**e, "loc": ("tracking", *e["loc"])}, raw) for e in err.errors()]
        raise LowbitError(f"{path}: invalid params:\n  " + "\n  ".join(lines)) from None


def selection_from_args(args: argparse.Namespace, default_experiment: str) -> Selection:
    """Validate the options together: --run names runs exactly, the filters pick from the experiment."""
    filters = {"--last": args.last is not None, "--tag": bool(args.tags), "--since": args.since is not None,
               "--until": args.until is not None, "--status": args.status is not None}
    if args.runs and any(filters.values()):
        used = ", ".join(name for name, given in filters.items() if given)
        raise LowbitError(f"--run names the runs to compare; {used} pick runs from the experiment: use one or the other")
    if args.last is not None and args.last < 1:
        raise LowbitError(f"--last {args.last}: must be 1 or more")
    since = parse_date(args.since, "--since") if args.since else None
    until = parse_date(args.until, "--until", end_of_day=True) if args.until else None
    if since is not None and until is not None and since >= until:
        raise LowbitError(f"--since {args.since} is not before --until {args.until}: no run can match")
    last = args.last
    if last is None and not args.runs and since is None and until is None:
        last = DEFAULT_LAST
    return Selection(experiment=args.experiment or default_experiment, run_ids=tuple(dict.fromkeys(args.runs)),
                     last=last, tags=parse_tags(args.tags), since_ms=since, until_ms=until,
                     status=args.status or "FINISHED", variants=tuple(args.variants))


def parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LowbitError(f"--tag {item!r}: expected KEY=VALUE, e.g. --tag lowbit.git_dirty=false")
        tags[key.strip()] = value
    return tags


def parse_date(text: str, option: str, end_of_day: bool = False) -> int:
    """Epoch milliseconds of an ISO date or date-time; naive ones are UTC (MLflow stores UTC, and a
    scheduled run's machine clock is often UTC too). A bare date as an upper bound means the end of
    that day, so `--until 2025-03-31` keeps runs started on the 31st."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    if day is not None:
        moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + (timedelta(days=1) if end_of_day else timedelta())
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise LowbitError(f"{option} {text!r}: not an ISO date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM] "
                              "(UTC unless an offset is given)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        if end_of_day:  # an exact time as upper bound is inclusive; the filter is exclusive
            moment += timedelta(milliseconds=1)
    return int(moment.timestamp() * 1000)


def iso_utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- fetching (the only part that touches MLflow)


def fetch_runs(uri: str, selection: Selection) -> list[PipelineRun]:
    """The selected pipeline runs (reference first) with their variant runs."""
    client = open_store(uri)
    with store_errors(uri):
        experiment = find_experiment(client, uri, selection.experiment)
        if selection.run_ids:
            resolved = [resolve_run(client, experiment, ident) for ident in selection.run_ids]
            parents = list({run.info.run_id: run for run in resolved}.values())  # a prefix and the full id: once
        else:
            parents = search_parents(client, experiment, selection)
        return [pipeline_run(client, parent) for parent in parents]


def find_experiment(client: MlflowClient, uri: str, name: str):
    found = client.get_experiment_by_name(name)
    if found is None or found.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        state = "is deleted" if found is not None else "not found"
        raise LowbitError(f"experiment {name!r} {state} in {uri}; experiments there: {', '.join(names) or '(none)'} "
                          "(--experiment NAME; the default is tracking.experiment in params.yaml)")
    return found


def search_parents(client: MlflowClient, experiment, selection: Selection) -> list:
    # A parent run is one without mlflow.parentRunId: runs older than the lowbit.kind tag have none either.
    clauses = ["tags.`mlflow.parentRunId` IS NULL"]
    if selection.status != "any":
        clauses.append(f"attributes.status = '{selection.status}'")
    if selection.since_ms is not None:
        clauses.append(f"attributes.start_time >= {selection.since_ms}")
    if selection.until_ms is not None:
        clauses.append(f"attributes.start_time < {selection.until_ms}")
    newest_first = all_runs(client, experiment.experiment_id, " and ".join(clauses), "DESC", page_size=200)
    # Tag values are compared here, not in the filter string: no quoting rules to get wrong.
    matching = (run for run in newest_first if run.data.tags.get("lowbit.kind", "pipeline") == "pipeline"
                and all(run.data.tags.get(k) == v for k, v in selection.tags.items()))
    found = list(itertools.islice(matching, selection.last))  # stops fetching pages once `last` are found
    if not found:
        raise LowbitError(f"no pipeline run in experiment {experiment.name!r} matches {describe(selection)}")
    return found


def describe(selection: Selection) -> str:
    parts = [f"status {selection.status}"]
    parts += [f"tag {k}={v}" for k, v in selection.tags.items()]
    if selection.since_ms is not None:
        parts.append(f"started from {iso_utc(selection.since_ms)}")
    if selection.until_ms is not None:
        parts.append(f"started before {iso_utc(selection.until_ms)}")
    return ", ".join(parts)


def resolve_run(client: MlflowClient, experiment, ident: str):
    """A full run id (any experiment) or a prefix unique among the experiment's pipeline runs."""
    from mlflow.exceptions import MlflowException

    key = ident.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,32}", key):
        raise LowbitError(f"--run {ident!r}: not a run id (hexadecimal: the full id or a unique prefix)")
    if len(key) == 32:
        try:
            run = client.get_run(key)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise LowbitError(f"--run {ident}: no such run in this MLflow store") from None
    else:
        matches = list(client.search_runs([experiment.experiment_id],
                                          f"attributes.run_id LIKE '{key}%' and tags.`mlflow.parentRunId` IS NULL",
                                          max_results=10))
        if not matches:
            raise LowbitError(f"--run {ident}: no pipeline run in experiment {experiment.name!r} has an id starting with it")
        if len(matches) > 1:
            listed = ", ".join(r.info.run_id for r in matches)
            raise LowbitError(f"--run {ident}: ambiguous, it starts {listed}; give more characters")
        run = matches[0]
    if run.info.lifecycle_stage != "active":
        raise LowbitError(f"--run {ident}: run {run.info.run_id} is deleted")
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        raise LowbitError(f"--run {ident}: {run.info.run_id} is the variant run "
                          f"{run.data.tags.get('lowbit.variant', run.info.run_name)!r} of pipeline run {parent}; pass that one")
    return run


def pipeline_run(client: MlflowClient, run) -> PipelineRun:
    experiment = client.get_experiment(run.info.experiment_id).name
    return PipelineRun(run.info.run_id, experiment, run.info.start_time, run.info.status, dict(run.data.params),
                       dict(run.data.tags), variant_runs(client, run))


# ---------------------------------------------------------------- the table (plain data, no MLflow)


def differing_params(runs: list[PipelineRun]) -> list[str]:
    """Param keys whose value is not the same in every run (a key a run lacks counts as differing)."""
    keys = sorted({key for run in runs for key in run.params})
    return [key for key in keys if len({run.params.get(key) for run in runs}) > 1]


def split_labels(runs: list[PipelineRun]) -> dict[str, str]:
    """A letter per distinct test-split digest in order of first appearance; A is the first run's
    (and no one's when the first run recorded none)."""
    labels: dict[str, str] = {}
    reference = reference_digest(runs)
    digests = [digest for run in runs for digest in (run.test_digest, *(row_digest(run, v) for v in run.variants))]
    for digest in [reference, *digests]:
        if digest and digest not in labels:
            n = len(labels) + (reference is None)
            labels[digest] = string.ascii_uppercase[n] if n < 26 else f"S{n + 1}"
    return labels


def reference_digest(runs: list[PipelineRun]) -> str | None:
    """The first run's test-split digest (from a variant run where only those carry it)."""
    return runs[0].test_digest or next((row_digest(runs[0], v) for v in runs[0].variants), None)


def row_digest(run: PipelineRun, variant: VariantRun) -> str | None:
    """The variant run's own digest; the parent's for runs that tagged only the parent."""
    return variant.tags.get("lowbit.test_digest") or run.test_digest


def build_frame(runs: list[PipelineRun], variant_globs: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per (run, variant), grouped by variant (first-run order), runs in selection order.

    `comparable` is whether the row's test split is the first run's; a row with no recorded digest
    (runs from before the lineage tags) cannot be shown to be, so it is not."""
    import pandas as pd

    if not runs:
        raise LowbitError("no runs to compare")
    keys = differing_params(runs)
    labels = split_labels(runs)
    reference = reference_digest(runs)
    order = list(dict.fromkeys(v.variant for run in runs for v in run.variants))
    if variant_globs:
        kept = [name for name in order if any(fnmatch.fnmatchcase(name, glob) for glob in variant_globs)]
        if not kept:
            raise LowbitError(f"--variant {' '.join(variant_globs)}: no variant of the selected runs matches; "
                              f"they have: {', '.join(order) or '(none)'}")
        order = kept
    rows = []
    for name in order:
        for run in runs:
            variant = next((v for v in run.variants if v.variant == name), None)
            if variant is None:
                continue
            digest = row_digest(run, variant)
            rows.append({
                "run_id": run.run_id, "run": run.short, "experiment": run.experiment, "started": iso_utc(run.start_ms),
                "status": run.status, "git_commit": run.tags.get("lowbit.git_commit", ""),
                "git_dirty": run.tags.get("lowbit.git_dirty") == "true",
                **{f"params.{key}": run.params.get(key) for key in keys},
                "variant": name, "format": variant.tags.get("lowbit.format", ""),
                **{metric: variant.metrics.get(metric, math.nan) for metric in METRICS},
                "test_digest": digest or "", "split": labels.get(digest, "?") if digest else "?",
                "comparable": bool(digest) and digest == reference,
            })
    columns = ["run_id", "run", "experiment", "started", "status", "git_commit", "git_dirty",
               *(f"params.{key}" for key in keys), "variant", "format", *METRICS, "test_digest", "split", "comparable"]
    return pd.DataFrame(rows, columns=columns)


def incomparable_runs(frame: pd.DataFrame) -> dict[str, str]:
    """{short run id: split label} of the runs with a row on another test split than the first run's."""
    bad = frame[~frame["comparable"].astype(bool)]
    return dict(zip(bad["run"], bad["split"]))


def refuse_incomparable(frame: pd.DataFrame, runs: list[PipelineRun]) -> None:
    bad = incomparable_runs(frame)
    if not bad:
        return
    ref = f"run {runs[0].short}" + (" (split A)" if reference_digest(runs) else ", which recorded no test-split digest")
    listed = ", ".join(f"{run} (split {label}{', no digest recorded' if label == '?' else ''})" for run, label in bad.items())
    raise LowbitError(f"--strict: the test split of {listed} is not that of {ref}: their accuracies are not comparable. "
                      "Compare runs evaluated on the same split, or drop --strict to see them flagged")


def _num(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def accuracy_cell(row) -> str:
    if math.isnan(row["accuracy"]):
        return "–"
    if math.isnan(row["accuracy_ci_low"]) or math.isnan(row["accuracy_ci_high"]):
        return f"{row['accuracy']:.4f}"
    return f"{row['accuracy']:.4f} [{row['accuracy_ci_low']:.3f}, {row['accuracy_ci_high']:.3f}]"


def delta_cell(row) -> str:
    if math.isnan(row["accuracy_delta"]):
        return "–"
    return f"{row['accuracy_delta']:+.2f}" + ("†" if row["accuracy_delta_significant"] == 1.0 else "")


def commit_label(row) -> str:
    return (row["git_commit"][:SHORT_ID] or "?") + ("+dirty" if row["git_dirty"] else "")


def comparison_markdown(frame: pd.DataFrame, runs: list[PipelineRun], source: str) -> str:
    """The table, then what its marks mean: printed by `lowbit compare` and written to comparison.md."""
    param_columns = [c for c in frame.columns if c.startswith("params.")]
    commits = {commit_label(row) for _, row in frame.iterrows()}
    show_commit = len(commits) > 1
    show_status = bool(len(frame)) and set(frame["status"]) != {"FINISHED"}
    header = ["run", "started", *(["status"] if show_status else []), *(["commit"] if show_commit else []),
              *(c.removeprefix("params.") for c in param_columns), "variant", "accuracy [95% CI]", "Δacc pts",
              "f1_macro", "weight MiB", "p50 ms", "samples/s", "split"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in frame.iterrows():
        cells = [row["run"], row["started"][:16].replace("T", " "), *([row["status"]] if show_status else []),
                 *([commit_label(row)] if show_commit else []),
                 *(_num(row[c], "{}") for c in param_columns),
                 row["variant"], accuracy_cell(row), delta_cell(row), _num(row["f1_macro"], "{:.4f}"),
                 _num(row["weight_bytes"] / MIB, "{:.1f}"), _num(row["latency_ms_p50"], "{:.2f}"),
                 _num(row["throughput_samples_s"], "{:.1f}"), row["split"] + ("" if row["comparable"] else " ‡")]
        lines.append("| " + " | ".join(cells) + " |")
    labels = split_labels(runs)
    listing = [f"Runs from {source}; the first, {runs[0].short}, is the reference for the test split:", ""]
    listing += [f"- {run.short} = {run.run_id}, started {iso_utc(run.start_ms)}, {run.status}, "
                f"commit {run.tags.get('lowbit.git_commit', '?')[:12]}, test split {labels.get(run.test_digest, '?')}"
                + (f", overrides: {run.tags['lowbit.overrides']}" if run.tags.get("lowbit.overrides") else "")
                + ("" if run.variants else " (no variant runs)")
                for run in runs]
    notes = []  # paragraphs
    if param_columns:
        shown = ", ".join(c.removeprefix("params.") for c in param_columns)
        notes.append(f"Params that differ between these runs are columns ({shown}); every other param is equal.")
    elif len(runs) > 1:
        notes.append("Every param is equal in these runs.")
    bad = incomparable_runs(frame)
    if bad and reference_digest(runs) is None:
        notes.append(f"‡ the first run, {runs[0].short}, recorded no test-split digest: no row can be shown to be "
                     "on its test split, so no accuracy here is known to be comparable with another.")
        bad = {}
    for label in dict.fromkeys(bad.values()):
        names = ", ".join(run for run, lab in bad.items() if lab == label)
        if label == "?":
            notes.append(f"‡ split ?: run(s) {names} recorded no test-split digest, so their accuracies cannot be shown "
                         "to be comparable with the others.")
        else:
            notes.append(f"‡ split {label}: run(s) {names} were evaluated on another test split than split A; "
                         "their accuracies, deltas and F1 are not comparable with split A's.")
    notes.append("accuracy [95% CI]: bootstrap interval over test rows. Δacc pts: the variant minus its own run's fp32, "
                 "in points; † = significant (McNemar). weight MiB: bytes in memory. p50 ms: batch of 1; "
                 "samples/s: evaluation batch.")
    return "\n".join(["# lowbit compare", "", *lines, "", *listing, "", "\n\n".join(notes)]) + "\n"


# ---------------------------------------------------------------- outputs


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def pareto_across_runs(frame: pd.DataFrame, path: Path) -> None:
    """Accuracy against weight bytes: one colour and marker per run, a dashed Pareto front per run,
    hollow markers for runs on another test split, a label per variant (shared where points overlap)."""
    from lowbit.report import label_groups, pareto_front
    from lowbit.tables import plt, save_png

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10").colors
    points = []
    for i, run in enumerate(dict.fromkeys(frame["run"])):
        rows = frame[frame["run"] == run].dropna(subset=["accuracy", "weight_bytes"])
        if rows.empty:
            continue
        colour, marker = colours[i % len(colours)], MARKERS[i % len(MARKERS)]
        same_split = bool(rows["comparable"].all())
        label = f"{run} {rows['started'].iloc[0][:16].replace('T', ' ')}"
        label += "" if same_split else f" (split {rows['split'].iloc[0]} ‡)"
        xs, ys = rows["weight_bytes"] / MIB, rows["accuracy"]
        ax.scatter(xs, ys, marker=marker, s=36, label=label, zorder=3, edgecolors=colour,
                   facecolors=colour if same_split else "none")
        # weight_bytes: runs logged before serving_memory_bytes was measured have it too
        front = pareto_front([{"variant": v, "metrics": {"accuracy": a, "weight_bytes": w}}
                              for v, a, w in zip(rows["variant"], rows["accuracy"], rows["weight_bytes"])],
                             memory="weight_bytes")
        edge = sorted((w / MIB, a) for v, a, w in zip(rows["variant"], rows["accuracy"], rows["weight_bytes"]) if v in front)
        ax.plot(*zip(*edge), color=colour, linestyle="--", linewidth=1, zorder=2)
        points += list(zip(rows["variant"], xs, ys))
    if points:
        for names, x, y in label_groups(points):
            ax.annotate("\n".join(dict.fromkeys(names)), (x, y), textcoords="offset points", xytext=(5, 2), fontsize=7, va="top")
        hollow = "; hollow: another test split" if not frame["comparable"].all() else ""
        ax.legend(loc="lower right", fontsize=8, title=f"run (dashed: its Pareto front{hollow})", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no variant has both accuracy and weight_bytes", ha="center", transform=ax.transAxes)
    ax.set_xlabel("weight_bytes (MiB, as held in memory)")
    ax.set_ylabel("test accuracy")
    ax.set_title("lowbit compare: accuracy vs memory across runs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)


def write_outputs(frame: pd.DataFrame, markdown: str, out: Path) -> None:
    """Each file is written beside its final name and renamed into place: a reader never sees half of one."""
    from lowbit.io import atomic_write_text

    atomic_write_text(out / "comparison.csv", frame.to_csv(index=False))
    atomic_write_text(out / "comparison.md", markdown)
    pareto_across_runs(frame, out / "pareto.png")
