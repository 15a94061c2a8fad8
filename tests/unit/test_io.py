import pytest

from lowbit.io import atomic_dir, read_json, sha256_tree, write_json


def test_atomic_dir_replaces_the_output_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    assert (final / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half-writ")
            raise RuntimeError("killed mid-write")
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup left behind

    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_json_round_trips_and_leaves_no_temp(tmp_path):
    write_json(tmp_path / "m.json", {"accuracy": 0.5, "n": 3})
    assert read_json(tmp_path / "m.json") == {"accuracy": 0.5, "n": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_sha256_tree_depends_on_names_and_contents(tmp_path):
    (tmp_path / "a").write_text("1")
    first = sha256_tree(tmp_path)
    (tmp_path / "a").write_text("2")
    second = sha256_tree(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    assert len({first, second, sha256_tree(tmp_path)}) == 3
