from pathlib import Path

import pytest
import yaml

from lowbit.config import Params, load_params, parse_override, preset_overrides, validate_params, write_overrides
from lowbit.declared import observer_names, scheme_names
from lowbit.errors import LowbitError
from tests.conftest import REPO


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_yaml_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    assert params.model.name == "embedded:minilm-l6"
    assert params.digest() == load_params(REPO / "params.yaml").digest()  # the hash MLflow records is stable
    assert params.digest() != load_params(REPO / "params.yaml", ["baseline.seed=1"]).digest()
    assert set(raw_params()) == set(Params.model_fields)


def test_every_params_value_has_a_tradeoff_comment():
    lines = [l for l in (REPO / "params.yaml").read_text().splitlines() if l.startswith("  ") and ":" in l]
    uncommented = [l for l in lines if "#" not in l]
    assert lines and not uncommented


def test_unknown_key_names_file_dotted_key_and_allowed_keys():
    raw = raw_params()
    raw["baseline"]["epoch"] = 2
    with pytest.raises(LowbitError) as err:
        validate_params(raw, "params.yaml")
    message = str(err.value)
    assert "params.yaml" in message
    assert "baseline.epoch: unknown key" in message
    assert "epochs" in message and "learning_rate" in message


def test_wrong_type_and_out_of_range_values_are_reported_with_key_and_value():
    raw = raw_params()
    raw["baseline"]["epochs"] = "three"
    raw["prepare"]["val_fraction"] = 0.9
    with pytest.raises(LowbitError) as err:
        validate_params(raw, "params.yaml")
    message = str(err.value)
    assert "baseline.epochs" in message and "'three'" in message
    assert "prepare.val_fraction" in message and "0.9" in message


def test_missing_key_is_an_error_not_a_silent_default():
    raw = raw_params()
    del raw["tracking"]["uri"]
    with pytest.raises(LowbitError, match=r"tracking\.uri: missing"):
        validate_params(raw, "params.yaml")


def test_ema_qat_ranges_without_any_ema_steps_are_refused_naming_both_keys():
    raw = raw_params()
    raw["qat"] |= {"init_observer": "ema", "observer_freeze_fraction": 0.0}
    with pytest.raises(LowbitError) as err:
        validate_params(raw, "params.yaml")
    assert "qat: init_observer 'ema'" in str(err.value) and "observer_freeze_fraction must be > 0" in str(err.value)
    raw["qat"]["observer_freeze_fraction"] = 0.25
    assert validate_params(raw, "params.yaml").qat.init_observer == "ema"


def test_override_parses_yaml_values_and_applies():
    assert parse_override("baseline.learning_rate=1e-4") == ("baseline.learning_rate", 1e-4)
    assert parse_override("data.test_source=null") == ("data.test_source", None)
    params = load_params(REPO / "params.yaml", ["baseline.epochs=2", "model.max_length=32"])
    assert params.baseline.epochs == 2 and params.model.max_length == 32


@pytest.mark.parametrize("item, fragment", [
    ("baseline.epochs", "expected KEY=VALUE"),
    ("baseline.epoch=2", "unknown key; keys in baseline"),
    ("nosuch.key=1", "'nosuch' is not a section"),
])
def test_bad_overrides_are_explained(item, fragment):
    with pytest.raises(LowbitError, match=fragment):
        load_params(REPO / "params.yaml", [item])


def test_write_overrides_keeps_comments_and_refuses_invalid_values(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    changes = write_overrides(path, ["baseline.epochs=5"])
    assert changes == [("baseline.epochs", 2, 5)]
    text = path.read_text()
    assert "epochs: 5" in text and "# more epochs fit better" in text
    before = path.read_text()
    with pytest.raises(LowbitError, match="baseline.epochs"):
        write_overrides(path, ["baseline.epochs=0"])
    assert path.read_text() == before


def test_digest_changes_with_any_value():
    a = load_params(REPO / "params.yaml")
    b = load_params(REPO / "params.yaml", ["evaluate.latency_samples=101"])
    assert a.digest() == load_params(REPO / "params.yaml").digest()
    assert a.digest() != b.digest()


def test_scheme_and_observer_names_are_checked_against_their_registries():
    from lowbit.quant.observers import OBSERVERS
    from lowbit.quant.schemes import SCHEMES

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["ptq"]["schemes"] = ["int8_dynamic", "int3"]
    raw["ptq"]["observers"] = ["perc"]
    raw["qat"]["init_observer"] = "median"
    with pytest.raises(LowbitError) as err:
        validate_params(raw, "params.yaml")
    message = str(err.value)
    assert f"ptq.schemes: 'int3' is not one of the schemes: {', '.join(SCHEMES)}" in message
    assert "int4_weight_only" in message  # registered by its module alone
    assert f"ptq.observers: 'perc' is not one of the observers: {', '.join(OBSERVERS)}" in message
    assert "qat.init_observer: 'median' is not one of the observers (or ema): ema, minmax" in message
    # validation reads the names from the source (importing the registries costs seconds): the same lists
    assert scheme_names() == list(SCHEMES) and observer_names() == list(OBSERVERS)


def test_a_dvc_remote_is_a_url_an_absolute_path_or_empty():
    raw = raw_params()
    assert validate_params(raw, "params.yaml").tracking.dvc_remote == ""  # the project's default remote
    for url in ("s3://bucket/lowbit-dvc", "gs://bucket/dvc", "/srv/dvc-remote"):
        raw["tracking"]["dvc_remote"] = url
        assert validate_params(raw, "params.yaml").tracking.dvc_remote == url
    raw["tracking"]["dvc_remote"] = "bucket/lowbit-dvc"  # no scheme: relative to whatever the cwd is
    with pytest.raises(LowbitError, match=r"tracking\.dvc_remote: 'bucket/lowbit-dvc' is not a remote URL; "
                                          r"give e\.g\. s3://bucket/lowbit-dvc"):
        validate_params(raw, "params.yaml")


def test_a_preset_becomes_overrides_and_every_shipped_preset_is_valid(tmp_path: Path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "small.yaml").write_text("data:\n  builtin_rows: 500\n  max_rows: null\nptq:\n  observers: [minmax]\n")
    overrides = preset_overrides(tmp_path, "small")
    assert overrides == ["data.builtin_rows=500", "data.max_rows=null", 'ptq.observers=["minmax"]']
    params = load_params(REPO / "params.yaml", overrides)
    assert params.data.builtin_rows == 500 and params.data.max_rows is None and params.ptq.observers == ["minmax"]
    shipped = sorted((REPO / "presets").glob("*.yaml"))
    assert shipped, "presets/ ships at least the full-size configuration"
    for path in shipped:
        load_params(REPO / "params.yaml", preset_overrides(REPO, path.stem))  # raises on a key or value params.yaml refuses


def test_an_unknown_preset_names_the_file_and_the_presets_there(tmp_path: Path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "full.yaml").write_text("baseline:\n  epochs: 3\n")
    with pytest.raises(LowbitError, match=r"preset 'fast': there is no .*presets/fast.yaml; presets in .*: full"):
        preset_overrides(tmp_path, "fast")
    (tmp_path / "presets" / "broken.yaml").write_text("- just a list\n")
    with pytest.raises(LowbitError, match=r"broken.yaml: expected sections of params.yaml"):
        preset_overrides(tmp_path, "broken")
