"""Same params and seed, fresh processes: bit-identical trained weights (torch seeds every process differently)."""

import json
import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file

from tests.conftest import REPO, set_params
from tests.tiny_model import tiny_classifier_dir

THREADS = 1  # not torch's default on a machine of 2+ cores: the stage must have set it from params.yaml


def run_stage(root, stage) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), CI="1")
    done = subprocess.run([sys.executable, "-m", f"tasks.{stage}"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # stage_main prints the result as its last line


def test_the_baseline_stage_gives_bit_identical_weights_for_a_seed(tmp_path):
    # a saved head for 2 classes, data with 3: the stage draws a new head, as for any pretrained encoder
    model_dir = tiny_classifier_dir(tmp_path / "tiny", num_labels=2)
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    set_params(root / "params.yaml", {"model.name": str(model_dir), "model.max_length": 32, "data.builtin_rows": 120,
                                      "prepare.calib_size": 16, "baseline.epochs": 1, "baseline.batch_size": 16,
                                      "determinism.enabled": True, "determinism.num_threads": THREADS})
    run_stage(root, "prepare")
    weights = []
    for attempt in range(2):
        result = run_stage(root, "baseline")
        # what the stage applied, as it returned it and as it saved it beside the model (the flow logs that file)
        saved = json.loads((root / "models" / "baseline" / "lowbit_stage.json").read_text())
        applied = (result["deterministic"], result["torch_threads"])
        assert applied == (saved["deterministic"], saved["torch_threads"]) == (1, THREADS)
        weights.append(load_file(root / "models" / "baseline" / "model.safetensors"))
        shutil.rmtree(root / "models")
    assert weights[0].keys() == weights[1].keys() and "classifier.weight" in weights[0]
    assert all(weights[0][name].equal(weights[1][name]) for name in weights[0])
