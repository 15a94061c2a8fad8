"""lora: LoRA adapters on the frozen pretrained model (PEFT); exports the adapter and a merged copy.

Run: python -m tasks.lora   (dvc repro lora; lowbit run)
Reads params: lora.*, export.*, model.*, determinism.*   Writes: models/lora/adapter, models/lora/merged
"""

from __future__ import annotations

from tasks.adapter_stage import run_adapter_stage
from lowbit.config import Params
from lowbit.task_types import task_type
from tasks.plumbing import Paths, stage_main


def run(params: Params, paths: Paths) -> dict:
    return run_adapter_stage(
        "lora", params.lora, params, paths,
        build_base=lambda source, meta: task_type(params.model).load_pretrained(source, params.model, meta),
    )


if __name__ == "__main__":
    stage_main("lora", run)
