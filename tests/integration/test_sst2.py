"""Real data: the FP32 baseline on SST-2 (Socher et al., 2013) through the real stage functions.

4,000 training rows (seeded sample), 1 epoch, max length 64, evaluated on dev.tsv.
A plain HF script reaches 0.818 on similar data; lowbit must reach at least 0.80.
About 3 minutes on 2 cores: in `make test-slow`, so that `make test` stays under 15 minutes.
"""

from pathlib import Path

import pytest

from lowbit.config import load_params
from tasks.plumbing import Paths
from tasks import baseline, evaluate, prepare
from tests.conftest import REPO


@pytest.mark.slow
def test_sst2_baseline_reaches_080_on_dev(sst2_dir: Path, tmp_path: Path):
    # max_rows 4445 with val_fraction 0.1 leaves 4,000 rows to train on.
    params = load_params(REPO / "params.yaml", [
        f"data.source={sst2_dir / 'train.tsv'}", f"data.test_source={sst2_dir / 'dev.tsv'}",
        "data.text_column=sentence", "data.label_column=label", "data.max_rows=4445",
        "prepare.val_fraction=0.1", "prepare.calib_size=64",
        "model.max_length=64", "baseline.epochs=1", "baseline.batch_size=32", "evaluate.latency_samples=20",
    ])
    paths = Paths(tmp_path)
    prepared = prepare.run(params, paths)
    assert prepared["rows"]["train"] == 4000
    trained = baseline.run(params, paths)
    assert trained["total_params"] > 22_000_000
    result = evaluate.run(params, paths)
    accuracy = result["accuracy"]["fp32"]
    print(f"SST-2 dev accuracy: {accuracy:.4f} on {prepared['rows']['test']} rows")
    assert accuracy >= 0.80
