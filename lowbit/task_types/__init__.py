"""Task types: what differs between fine-tuning a classifier and instruction-tuning a chat LLM.

    task = task_type(params.model)                    # params.yaml model.task
    model = task.load_pretrained(source, params.model, meta)
    loader = task.make_loader(tokenizer, frame, batch_size, max_length, shuffle=True, seed=0)
    score = task.validation_score(model, loader)      # best-checkpoint selection (higher is better)

One module per task type (sequence_classification, causal_lm), each providing the same names:
  AUTO_MODEL        the transformers auto class its checkpoints load with
  HEAD              modules kept out of quantization and trained in full by adapters
  PEFT_TASK         PEFT's task type for adapters
  VALIDATION_METRIC the name of what `validation_score` returns (recorded as best_val_<name>)
  load_pretrained(source, model_params, meta) -> model   the stage's starting point (meta: prepared/meta.json)
  make_loader(tokenizer, frame, batch_size, max_length, shuffle=False, seed=0, group_by_length=False) -> DataLoader
  validation_score(model, loader) -> float
  prepare_splits(data_params, prepare_params, model_params) -> lowbit.data.Splits
Stages, schemes, adapters and evaluation call through these; adding a task type is one module here,
its entry in TASK_TYPES and in lowbit.config.ModelParams.task, plus its tests. The registry imports every module
statically, so dvc.yaml's dependency check (tests/unit/test_pipeline_definition.py) sees all of them.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lowbit.config import ModelParams
from lowbit.models import load_auto, load_tokenizer
from lowbit.task_types import causal_lm, sequence_classification

TASK_TYPES: dict[str, ModuleType] = {"sequence_classification": sequence_classification, "causal_lm": causal_lm}


def task_type(model: ModelParams | str) -> ModuleType:
    """The module of params.yaml's model.task (validated there against lowbit.config.TASK_TYPES)."""
    return TASK_TYPES[model if isinstance(model, str) else model.task]


def load_model(source: str | Path, model: ModelParams, **kwargs) -> PreTrainedModel:
    """A saved or pretrained model of params' task type (model.task), as saved: no new head."""
    return load_auto(task_type(model).AUTO_MODEL, str(source), model, **kwargs)


def load_saved(path: str | Path, model: ModelParams, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved model directory (the baseline, a merged copy) and its tokenizer: the one way
    lowbit loads a model it saved. kwargs go to from_pretrained (dtype, quantization_config)."""
    return load_model(path, model, **kwargs), load_tokenizer(str(path), model)
