"""qlora: LoRA adapters on the pretrained model held in 4-bit NF4 with double quantization (bitsandbytes).

Run: python -m tasks.qlora   (dvc repro qlora; lowbit run)
Reads params: qlora.*, export.*, model.*, determinism.*   Writes: models/qlora/adapter, models/qlora/merged
"""

from __future__ import annotations

from tasks.adapter_stage import run_adapter_stage
from lowbit.adapters import load_4bit_base
from lowbit.config import Params
from tasks.plumbing import Paths, stage_main


def run(params: Params, paths: Paths) -> dict:
    return run_adapter_stage(
        "qlora", params.qlora, params, paths,
        build_base=lambda source, meta: load_4bit_base(source, params.model, meta, params.qlora),
    )


if __name__ == "__main__":
    stage_main("qlora", run)
