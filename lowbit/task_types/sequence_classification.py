"""Sequence classification: a text in, one label out (the offline default: MiniLM on builtin:reviews).

Rows are `text` and an integer `label` (lowbit.data prepares them, stratified by label); a batch is
the texts tokenized with dynamic padding plus their labels; the model's head (`classifier`) is new,
sized by the prepared labels, kept in float by every quantization scheme and trained in full by
LoRA/QLoRA. Quality is accuracy, macro F1, calibration and loss over the class probabilities
(lowbit.evaluation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from lowbit.config import DataParams, ModelParams, PrepareParams
from lowbit.metrics import quality_metrics
from lowbit.models import load_classifier, model_device
from lowbit.task_types.sampling import training_order

AUTO_MODEL = AutoModelForSequenceClassification
HEAD = ["classifier"]  # BERT-style sequence classifiers; kept out of quantization and trained in full
ADAPTER_TRAINED_IN_FULL: list[str] | None = HEAD
PEFT_TASK = TaskType.SEQ_CLS
VALIDATION_METRIC = "accuracy"


def load_pretrained(source: str, model: ModelParams, meta: dict | None = None, **kwargs) -> torch.nn.Module:
    """The pretrained encoder with a fresh head sized by the prepared labels (meta.json's `labels`)."""
    return load_classifier(source, model, meta["labels"] if meta else None, **kwargs)


def make_loader(
    tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, batch_size: int, max_length: int,
    shuffle: bool = False, seed: int = 0, group_by_length: bool = False,
) -> DataLoader:
    """Batches of tokenized texts, padded per batch (dynamic padding), with `labels`.
    `group_by_length` (with `shuffle`): texts of similar length share batches (lowbit.task_types.sampling)."""
    texts = frame["text"].tolist()
    rows = list(zip(texts, frame["label"].tolist()))

    def collate(batch):
        texts, labels = zip(*batch)
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor(labels, dtype=torch.long)
        return enc

    order = None  # in row order
    if shuffle:
        order = training_order(len(rows), batch_size, seed, token_lengths(tokenizer, texts, max_length) if group_by_length else None)
    return DataLoader(rows, batch_size=batch_size, collate_fn=collate, sampler=order)


def token_lengths(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, chunk: int = 1024) -> list[int]:
    """Each text's token count after truncation, tokenized a chunk at a time: only the counts are kept."""
    lengths = []
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length)["input_ids"]
        lengths.extend(len(ids) for ids in encoded)
    return lengths


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, classes] float32, labels [n]) over a loader, model in eval mode."""
    model.eval()
    device = model_device(model)
    logits, labels = [], []
    for batch in loader:
        labels.append(batch.pop("labels").numpy())
        out = model(**{k: v.to(device) for k, v in batch.items()})
        logits.append(out.logits.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(labels)


def validation_figures(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    return quality_metrics(*predict_logits(model, loader))


def validation_score(model: torch.nn.Module, loader: DataLoader) -> float:
    return validation_figures(model, loader)[VALIDATION_METRIC]


def prepare_splits(data: DataParams, prep: PrepareParams, model: ModelParams):
    from lowbit.data import prepare_splits as labelled_splits

    return labelled_splits(data, prep)
