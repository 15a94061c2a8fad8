"""Shared benchmark plumbing: an SST-2 project per seed, stages run as their dvc.yaml commands.

Data: ../shared/data/sst2 (Socher et al., 2013). Training: 4,000 rows sampled with
seed 0 (data.max_rows 4445 less a 10% validation split), 1 epoch, max length 64.
Test: 872 dev rows sampled with seed 0 (the size of GLUE's SST-2 dev set, as in
the reference HF scripts).

Corpus `sst2-long`: the same sentences, each text made of SST-2 sentences of one label
(seeded order) joined until it fills max_length tokens, train from train.tsv and test from
dev.tsv (300 texts): real text whose batches are all full length, where SST-2's own average
13 tokens.

Each stage runs as the flow runs it (flows.dvc_stages.execute_stage: its dvc.yaml command in a
process of its own), so peak RSS figures are that stage's own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
WORK = REPO / "bench" / ".work"
TEST_ROWS = 872


def code_version() -> str:
    """The checkout's short commit, '+dirty' when tracked files differ from it: which code a measurement ran
    (the same reading as a pipeline run's lowbit.git_commit and lowbit.git_dirty tags)."""
    from flows.tracking import git_state

    commit, dirty = git_state(REPO)
    return commit[:7] + ("+dirty" if dirty else "")


def require_sst2() -> None:
    if not (SST2 / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {SST2}; the benchmarks need ../shared/data/sst2")


def dev_sample(root: Path) -> Path:
    path = root / "dev872.tsv"
    frame = pd.read_csv(SST2 / "dev.tsv", sep="\t", quoting=3)
    frame.sample(n=TEST_ROWS, random_state=0).to_csv(path, sep="\t", index=False, quoting=3)
    return path


def long_texts(source: Path, rows: int, max_length: int, seed: int = 0) -> pd.DataFrame:
    """`rows` texts, each SST-2 sentences of one label joined (seeded order) until it has max_length tokens."""
    from lowbit.models import load_tokenizer, resolve_model
    from lowbit.config import ModelParams

    tokenizer = load_tokenizer(resolve_model("embedded:minilm-l6"), ModelParams(task="sequence_classification", name="embedded:minilm-l6", trust_remote_code=False,
                                                                                   max_length=max_length))
    frame = pd.read_csv(source, sep="\t", quoting=3).sample(frac=1.0, random_state=seed)
    texts: list[dict] = []
    for label, group in frame.groupby("label"):
        text, tokens = [], 0
        for sentence in group["sentence"]:
            text.append(sentence.strip())
            tokens += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
            if tokens + 2 >= max_length:  # [CLS] and [SEP] too
                texts.append({"sentence": " ".join(text), "label": label})
                text, tokens = [], 0
    joined = pd.DataFrame(texts)
    if len(joined) < rows:
        sys.exit(f"{source} makes only {len(joined)} texts of {max_length} tokens; asked for {rows}")
    return joined.sample(n=rows, random_state=seed)


def long_corpus(root: Path, max_length: int) -> tuple[Path, Path]:
    train, test = root / "train_long.tsv", root / "dev_long.tsv"
    long_texts(SST2 / "train.tsv", 4445, max_length).to_csv(train, sep="\t", index=False, quoting=3)
    long_texts(SST2 / "dev.tsv", LONG_TEST_ROWS, max_length).to_csv(test, sep="\t", index=False, quoting=3)
    return train, test


CORPORA = ("sst2", "sst2-long")
# Full-length texts cost about 5x as much per row: 300 of them time throughput and latency as well
# as 872 would (the accuracy interval is wider; the corpus is there for speed).
LONG_TEST_ROWS = 300


def project_root(name: str, seed: int) -> Path:
    return WORK / f"{name}-seed{seed}"


def make_project(name: str, seed: int, overrides: list[str], corpus: str = "sst2") -> Path:
    from lowbit.config import write_overrides

    root = project_root(name, seed)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")  # the stage commands execute_stage runs
    train, test = long_corpus(root, 64) if corpus == "sst2-long" else (SST2 / "train.tsv", dev_sample(root))
    sst2 = [
        f"data.source={train}", f"data.test_source={test}", "data.text_column=sentence",
        "data.label_column=label", "data.max_rows=4445", "data.seed=0", "prepare.val_fraction=0.1",
        "model.max_length=64", "baseline.epochs=1", f"baseline.seed={seed}",
        "evaluate.latency_samples=100", "evaluate.batch_size=64",
    ]
    write_overrides(root / "params.yaml", sst2 + overrides)
    return root


def project(name: str, seed: int, overrides: list[str], reuse: bool, corpus: str = "sst2") -> Path:
    """A seed's project: made afresh, or (reuse) the one a previous run left, checked to exist."""
    if not reuse:
        return make_project(name, seed, overrides, corpus)
    root = project_root(name, seed)
    if not (root / "models").is_dir():
        sys.exit(f"--reuse: {root} has no trained models; run without --reuse first")
    return root


def run_stage(root: Path, stage: str) -> dict:
    from flows.dvc_stages import execute_stage

    execute_stage(root, stage, {"PYTHONPATH": str(REPO), "CI": "1"}, stdout=subprocess.DEVNULL)
    return stage_result(root, stage)


def stage_result(root: Path, stage: str) -> dict:
    from tasks.plumbing import Paths

    return json.loads(Paths(root).result(stage).read_text())


def variant_metrics(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json") if not p.stem.startswith("lowbit")}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def parse_args(doc: str, corpus: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    if corpus:  # bench.quant
        parser.add_argument("--corpus", nargs="+", choices=CORPORA, default=list(CORPORA))
        parser.add_argument("--qat", action="store_true", help="also train and compare QAT (about 2.5 minutes a seed more)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the models a previous run trained (bench/.work) and rerun only evaluate: "
                             "speed figures measured again, e.g. after something else shared the CPU")
    return parser.parse_args()


def emit(result: dict, out: Path | None) -> None:
    """Print the benchmark's JSON (and save it to `out`)."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
