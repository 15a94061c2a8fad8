"""prepare: load the raw dataset, validate, dedupe, split train/val/test, draw the calibration subset.

Run: python -m tasks.prepare   (dvc repro prepare; lowbit run)
Reads params: data.*, prepare.*, model.* (causal_lm: the tokenizer measures and drops examples over max_length)   Writes: data/prepared/{train,val,test,calib}.parquet, meta.json
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from lowbit.config import Params
from lowbit.task_types import task_type
from lowbit.io import atomic_dir, sha256_file, sha256_tree, write_json
from tasks.plumbing import RESULT_FILE, Paths, StageClock, stage_main

SPLITS = ("train", "val", "test", "calib")


def source_fingerprint(source: str | None) -> str | None:
    """sha256 of a local source file (traceability); builtin and hf: sources are named by their spec."""
    return sha256_file(source) if source and Path(source).is_file() else None


def run(params: Params, paths: Paths) -> dict:
    clock = StageClock()
    splits = task_type(params.model).prepare_splits(params.data, params.prepare, params.model)
    with atomic_dir(paths.prepared) as out:
        for name in SPLITS:
            getattr(splits, name).to_parquet(out / f"{name}.parquet", index=False)
        data_hash = sha256_tree(out)  # the four split files only: meta.json is written after
        meta = {
            "source": params.data.source,
            "source_sha256": source_fingerprint(params.data.source),
            "test_source": params.data.test_source,
            "test_source_sha256": source_fingerprint(params.data.test_source),
            "task": params.model.task,
            "labels": splits.labels,
            "rows": {name: len(getattr(splits, name)) for name in SPLITS},
            "cleaning": asdict(splits.report),
            "data_hash": data_hash,
        }
        if splits.labels:
            meta["class_counts"] = {name: getattr(splits, name)["label"].value_counts().sort_index().tolist() for name in SPLITS}
        write_json(out / "meta.json", meta)
        result = {"data_hash": data_hash, "rows": meta["rows"], "cleaning": meta["cleaning"], "stage_seconds": clock.seconds()}
        write_json(out / RESULT_FILE, result)
    return result


if __name__ == "__main__":
    stage_main("prepare", run)
