"""The calibration batches ptq and qat share: the calib split, tokenized as the baseline was.

    batches = calib_batches(paths, params)   # ptq.calib_rows rows in ptq.calib_batch_size batches
"""

from __future__ import annotations

import pandas as pd

from lowbit.config import Params
from lowbit.errors import LowbitError
from lowbit.models import load_tokenizer
from lowbit.task_types import task_type
from tasks.plumbing import Paths


def calib_batches(paths: Paths, params: Params) -> list:
    """The calib split's first ptq.calib_rows rows, tokenized as the baseline was (ptq and qat calibrate on them)."""
    calib = pd.read_parquet(paths.prepared / "calib.parquet")
    if len(calib) < params.ptq.calib_rows:
        raise LowbitError(
            f"params.yaml: ptq.calib_rows: {params.ptq.calib_rows} asked, but the calib split has {len(calib)} rows; "
            "lower ptq.calib_rows or raise prepare.calib_size"
        )
    tokenizer = load_tokenizer(str(paths.models / "baseline"), params.model)
    rows = calib.iloc[: params.ptq.calib_rows]
    return list(task_type(params.model).make_loader(tokenizer, rows, params.ptq.calib_batch_size, params.model.max_length))
