"""Memory measured per call in a child of its own: the same figures whatever ran before."""

from __future__ import annotations

import os
import signal

import numpy as np
import pandas as pd
import pytest

from lowbit.config import ModelParams, load_params
from lowbit.errors import LowbitError
from lowbit.isolation import Isolated
from lowbit.quant.scheme import SchemeContext
from lowbit.quant.schemes import SCHEMES
from lowbit.variants import write_card
from tasks.evaluate import CHILD_IMPORTS, measure_variants
from tests.conftest import REPO
from tests.tiny_model import tiny_classifier_dir

MIB = 1024 * 1024


def allocate(mib: int) -> float:
    """Touch `mib` MiB, so it is resident, and free it again before returning."""
    block = np.ones(mib * MIB // 8)
    return float(block.sum())


def fail_with_lowbit_error(message: str) -> None:
    raise LowbitError(message)


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def isolated():
    with Isolated(preload=CHILD_IMPORTS["sequence_classification"]) as pool:
        yield pool


def test_peak_over_floor_is_what_the_call_allocated_whatever_ran_before(isolated):
    floor = isolated.floor()
    big_first = [isolated.call(allocate, mib)[1] - floor for mib in (160, 40)]
    small_first = [isolated.call(allocate, mib)[1] - floor for mib in (40, 160)][::-1]
    for grown, mib in zip(big_first, (160, 40)):
        assert mib * MIB <= grown < (mib + 16) * MIB  # the block, plus numpy's own pages (8 MiB measured here)
    # In one process, the 40 MiB call after the 160 MiB one would read 160 (the peak, never lowered).
    assert big_first == pytest.approx(small_first, abs=2 * MIB)


def test_a_childs_error_is_raised_in_the_caller(isolated):
    with pytest.raises(LowbitError, match="the file is broken"):
        isolated.call(fail_with_lowbit_error, "the file is broken")
    assert isolated.call(allocate, 1)[0] == pytest.approx(MIB / 8)  # the pool still serves the next call


def test_a_killed_child_gives_a_clear_error_instead_of_a_broken_pool_traceback():
    with Isolated(preload=CHILD_IMPORTS["sequence_classification"]) as pool:
        with pytest.raises(LowbitError, match=r"child process running kill_myself\(\) died before answering.*dmesg"):
            pool.call(kill_myself)


@pytest.fixture(scope="module")
def two_variants(tmp_path_factory):
    """The tiny fp32 classifier and its NF4 copy (bitsandbytes is imported only by the NF4 child)."""
    root = tmp_path_factory.mktemp("variants")
    fp32 = tiny_classifier_dir(root / "baseline", num_labels=2, hidden_size=128)
    write_card(fp32, variant="fp32", fmt="hf", stage="baseline")
    model = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)
    SCHEMES["nf4"].build(SchemeContext(fp32, root / "ptq", model, ["classifier"], True, [], 99.9, 128, list))
    return {"fp32": fp32, "ptq_nf4": root / "ptq" / "ptq_nf4"}


def test_each_variants_memory_is_the_same_in_either_evaluation_order(two_variants):
    params = load_params(REPO / "params.yaml", ["model.max_length=32", "evaluate.latency_samples=5",
                                                "evaluate.bootstrap_resamples=50"])
    rows = [("a good film", 1), ("a dull mess", 0)] * 20
    test = pd.DataFrame(rows, columns=["text", "label"])
    figures = {}
    for order in (["fp32", "ptq_nf4"], ["ptq_nf4", "fp32"]):
        variants = {name: two_variants[name] for name in order}
        for variant, record, _, _ in measure_variants(variants, test, test, params, {"labels": ["neg", "pos"]}, threads=1):
            figures.setdefault(variant, []).append(record["metrics"])
    for variant, (first, second) in figures.items():
        # stated tolerance: 2 MiB or 5%, whichever is larger (allocator and page-fault granularity)
        tolerance = max(2 * MIB, 0.05 * first["serving_memory_bytes"])
        assert abs(first["serving_memory_bytes"] - second["serving_memory_bytes"]) <= tolerance, variant
        assert first["serving_memory_bytes"] == first["peak_rss_bytes"] - first["import_floor_bytes"]
        assert first["serving_memory_bytes"] >= first["weight_bytes"]  # it holds the model at least
