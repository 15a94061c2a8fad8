import time

import numpy as np
import pandas as pd
import pytest

from lowbit.builtin_data import LABELS, generate_reviews
from lowbit.config import DataParams, PrepareParams
from lowbit.data import CleanReport, clean, load_source, prepare_splits
from lowbit.errors import LowbitError


def data_params(**overrides) -> DataParams:
    base = dict(source="builtin:reviews", header=True, text_column="text", label_column="label", test_source=None,
                max_rows=None, builtin_rows=600, reverse=False, seed=0)
    return DataParams(**(base | overrides))


PREP = PrepareParams(val_fraction=0.1, test_fraction=0.2, calib_size=32)


def write_frame(path, frame: pd.DataFrame):
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def sample_frame(n=60) -> pd.DataFrame:
    return pd.DataFrame({"sentence": [f"text number {i}" for i in range(n)], "y": ["pos", "neg", "neu"] * (n // 3)})


def test_builtin_reviews_is_deterministic_and_balanced():
    a, b = generate_reviews(300, seed=7), generate_reviews(300, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert not generate_reviews(300, seed=8).equals(a)
    counts = a["label"].value_counts()
    assert set(counts.index) == set(LABELS)
    assert counts.min() > 70  # uniform draw: ~100 each


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_file_sources_with_configurable_columns(tmp_path, suffix):
    path = write_frame(tmp_path / f"data{suffix}", sample_frame())
    frame = load_source(str(path), data_params(text_column="sentence", label_column="y"))
    assert list(frame.columns) == ["text", "label"]
    assert len(frame) == 60 and frame["text"].iloc[5] == "text number 5"


def test_headerless_csv_and_tsv_by_column_position(tmp_path):
    # AG News layout: class index, title, description; no header row
    rows = [(1 + i % 4, f"title {i}", f"description, number {i}") for i in range(80)]
    (tmp_path / "news.csv").write_text("".join(f'"{label}","{title}","{text}"\n' for label, title, text in rows))
    (tmp_path / "news.tsv").write_text("".join(f"{label}\t{title}\t{text}\n" for label, title, text in rows))
    for name in ("news.csv", "news.tsv"):
        params = data_params(source=str(tmp_path / name), header=False, text_column=2, label_column=0)
        frame = load_source(params.source, params)
        assert len(frame) == 80  # the first row is data, not a header
        assert frame["text"].iloc[0] == "description, number 0" and frame["label"].iloc[0] == 1
        splits = prepare_splits(params, PREP)
        assert splits.labels == ["1", "2", "3", "4"]


def test_headerless_params_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="text_column: 'text' is a column name, but header is false"):
        data_params(header=False, label_column=0)
    with pytest.raises(ValueError, match="label_column: -1 is not a column position"):
        data_params(label_column=-1)
    (tmp_path / "two.csv").write_text("a,1\nb,2\n")
    with pytest.raises(LowbitError, match=r"data.text_column: position 5 is past the last column; the file has 2 columns"):
        load_source(str(tmp_path / "two.csv"), data_params(header=False, text_column=5, label_column=1))
    path = write_frame(tmp_path / "d.jsonl", sample_frame())
    with pytest.raises(LowbitError, match="data.header: false applies to CSV/TSV files"):
        load_source(str(path), data_params(header=False, text_column=0, label_column=1))


def test_int_labels_keep_numeric_order_and_label_map(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(90)], "label": [10, 2, 1] * 30})
    path = write_frame(tmp_path / "d.csv", frame)
    splits = prepare_splits(data_params(source=str(path)), PREP)
    assert splits.labels == ["1", "2", "10"]
    original = frame.set_index("text")["label"]
    for _, row in splits.train.iterrows():
        assert splits.labels[row["label"]] == str(original[row["text"]])


def test_missing_column_lists_the_columns(tmp_path):
    path = write_frame(tmp_path / "d.csv", sample_frame())
    with pytest.raises(LowbitError) as err:
        load_source(str(path), data_params(text_column="text"))
    assert "'text'" in str(err.value) and "data.text_column" in str(err.value) and "sentence, y" in str(err.value)


def test_empty_file_and_missing_file_and_bad_extension(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(LowbitError, match="empty.csv: cannot be read"):
        load_source(str(tmp_path / "empty.csv"), data_params())
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(LowbitError, match="header.csv: the file has no rows"):
        load_source(str(tmp_path / "header.csv"), data_params())
    with pytest.raises(LowbitError, match="file not found"):
        load_source(str(tmp_path / "nope.csv"), data_params())
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(LowbitError, match="unsupported extension '.xlsx'"):
        load_source(str(tmp_path / "d.xlsx"), data_params())


def test_single_class_is_rejected(tmp_path):
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["same"] * 20})
    with pytest.raises(LowbitError, match="only one class"):
        prepare_splits(data_params(source=str(write_frame(tmp_path / "d.csv", frame))), PREP)


def test_clean_drops_and_counts_empty_nan_duplicates_and_conflicts():
    frame = pd.DataFrame({
        "text": ["a", "  ", None, np.nan, "b", "b", "c", "c", "d"],
        "label": [0, 1, 1, 0, 1, 1, 0, 1, None],
    })
    report = CleanReport()
    out = clean(frame, report)
    assert out["text"].tolist() == ["a", "b"]
    assert (report.dropped_empty_text, report.dropped_duplicates, report.dropped_conflicting_labels,
            report.dropped_missing_label) == (3, 1, 2, 1)


def test_splits_are_stratified_seeded_disjoint_and_calib_from_train():
    splits = prepare_splits(data_params(builtin_rows=900), PREP)
    texts = [set(getattr(splits, n)["text"]) for n in ("train", "val", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    total = sum(len(t) for t in texts)
    assert abs(len(splits.test) / total - 0.2) < 0.01 and abs(len(splits.val) / total - 0.1) < 0.01
    shares = [getattr(splits, n)["label"].value_counts(normalize=True).sort_index() for n in ("train", "test")]
    assert np.allclose(shares[0].values, shares[1].values, atol=0.02)
    assert len(splits.calib) == 32 and set(splits.calib["text"]) <= texts[0]
    again = prepare_splits(data_params(builtin_rows=900), PREP)
    pd.testing.assert_frame_equal(splits.test, again.test)


def test_test_source_overlap_is_removed_from_train(tmp_path):
    train = pd.DataFrame({"text": [f"t{i}" for i in range(90)], "label": ["a", "b", "c"] * 30})
    test = pd.DataFrame({"text": [f"t{i}" for i in range(80, 100)], "label": ["a", "b"] * 10})
    params = data_params(source=str(write_frame(tmp_path / "train.tsv", train)),
                         test_source=str(write_frame(tmp_path / "test.tsv", test)))
    splits = prepare_splits(params, PREP)
    assert splits.report.dropped_test_overlap == 10
    assert len(splits.test) == 20
    assert not set(splits.train["text"]) & set(splits.test["text"])


def test_calib_larger_than_train_is_explained():
    with pytest.raises(LowbitError, match="prepare.calib_size: 5000 exceeds"):
        prepare_splits(data_params(), PrepareParams(val_fraction=0.1, test_fraction=0.2, calib_size=5000))


def test_hf_source_offline_fails_fast_naming_alternatives(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.perf_counter()
    with pytest.raises(LowbitError) as err:
        load_source("hf:glue:sst2", data_params())
    assert time.perf_counter() - started < 10
    assert "builtin:reviews" in str(err.value) and "data.source" in str(err.value)


def test_unknown_builtin_is_explained():
    with pytest.raises(LowbitError, match="unknown builtin dataset 'movies'; builtin: reviews"):
        load_source("builtin:movies", data_params())
