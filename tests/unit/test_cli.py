import os
import shutil

from flows.cli import COMPILE_CACHE_ENV, main
from tests.conftest import REPO


def test_check_reports_ok_with_the_params_hash(tmp_path, capsys):
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    assert main(["--root", str(tmp_path), "check"]) == 0
    assert "params.yaml: ok (params hash" in capsys.readouterr().out


def test_sensitivity_without_a_baseline_says_what_to_run(tmp_path, capsys):
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    assert main(["--root", str(tmp_path), "sensitivity"]) == 2
    assert "models/baseline not found; run `lowbit run`" in capsys.readouterr().err


def test_show_without_a_report_and_bad_parallel(tmp_path, capsys):
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    assert main(["--root", str(tmp_path), "show"]) == 2
    assert "summary.md not found" in capsys.readouterr().err
    assert main(["--root", str(tmp_path), "run", "--parallel", "0"]) == 2
    assert "--parallel 0: must be 1 or more" in capsys.readouterr().err


def test_compiled_kernels_are_cached_in_the_project_unless_a_cache_is_set(tmp_path, monkeypatch):
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert main(["--root", str(tmp_path), "check"]) == 0
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path.resolve() / ".cache" / "torchinductor")
    monkeypatch.setenv(COMPILE_CACHE_ENV, "/srv/inductor")
    assert main(["--root", str(tmp_path), "check"]) == 0
    assert os.environ[COMPILE_CACHE_ENV] == "/srv/inductor"
