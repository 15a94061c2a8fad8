"""The causal_lm pipeline for real: `lowbit run` (Prefect, DVC, MLflow) on a tiny random Llama, then a
rerun with nothing changed, which must train nothing. Slow (about 3 minutes): `make test-slow`."""

import pytest
from mlflow import MlflowClient

from flows.cli import main as lowbit_main
from lowbit.io import read_json
from tests.conftest import make_project
from tests.tiny_model import tiny_llama_dir

CAUSAL = {
    "model.task": "causal_lm", "model.max_length": 160, "data.source": "builtin:instructions", "data.builtin_rows": 64,
    "data.reverse": True, "prepare.calib_size": 8, "baseline.epochs": 1, "baseline.batch_size": 16,
    "ptq.schemes": ["int8_weight_only", "nf4"], "ptq.observers": ["minmax"], "ptq.skip_modules": ["lm_head"],
    "ptq.quantize_embeddings": False, "ptq.calib_rows": 8, "ptq.calib_batch_size": 8, "qat.batch_size": 16,
    "lora.epochs": 1, "lora.batch_size": 16, "qlora.epochs": 1, "qlora.batch_size": 16,
    "lora.target_modules": ["q_proj", "v_proj"], "qlora.target_modules": ["q_proj", "v_proj"],
    "export.max_merge_drop": 100.0, "evaluate.batch_size": 16, "evaluate.generation_samples": 4,
    "evaluate.max_new_tokens": 4, "evaluate.bootstrap_resamples": 100, "evaluate.calibration": "none",
}


@pytest.mark.slow
def test_lowbit_run_on_a_chat_model_then_a_rerun_trains_nothing(tmp_path, capsys):
    model_dir = tiny_llama_dir(tmp_path / "tiny-llama")
    root = make_project(tmp_path / "project", CAUSAL | {"model.name": str(model_dir)})
    assert lowbit_main(["--root", str(root), "run"]) == 0
    first = capsys.readouterr().out
    assert "stages run: prepare, baseline, ptq, qat, lora, qlora, evaluate, report" in first
    assert "| variant | token acc [95% CI] |" in first and "| zero_shot |" in first
    records = {p.stem for p in (root / "metrics").glob("*.json")} - {"lowbit_stage"}
    assert records == {"fp32", "zero_shot", "ptq_int8_weight_only", "ptq_nf4", "qat_int8", "lora", "lora_merged",
                       "qlora", "qlora_merged"}
    trained = {stage: read_json(root / "models" / stage / "lowbit_stage.json")["train_seconds"]
               for stage in ("baseline", "qat", "lora", "qlora")}
    assert lowbit_main(["--root", str(root), "run"]) == 0
    assert "stages run: nothing" in capsys.readouterr().out
    for stage, seconds in trained.items():  # the outputs are the first run's: nothing was trained again
        assert read_json(root / "models" / stage / "lowbit_stage.json")["train_seconds"] == seconds
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lowbit").experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
