"""Storage of models holding lowbit's quantized modules: plain safetensors plus a layout on the card.

    save_quantized(model, tokenizer, out, "ptq_int8_dynamic", "int8", layout, notes)
    model, tokenizer = load_quantized(out, card, model_params, int8_shell)

The directory holds the model config, the tokenizer, model.safetensors (the modules' own
buffers: int8 or packed int4 weights with their scales, calibrated activation qparams),
and a card whose `layout` names each quantized module ({module: kind}). Loading builds the
float architecture from the config, puts an empty shell of the right kind where the layout
says (`shell(kind, float_module)`), and loads the state dict strictly.

The `int8` format (save_int8 / load_int8) is used by ptq's int8 schemes, qat and merged
adapters re-quantized to int8; the int4 scheme uses the same mechanism with its own shells.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from lowbit.models import load_tokenizer
from lowbit.quant.ptq import int8_shell, set_module
from lowbit.variants import write_card

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams


def save_quantized(model, tokenizer, out: Path, variant: str, fmt: str, layout: dict[str, str], notes: list[str],
                   stage: str = "ptq", **info) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    write_card(out, variant, fmt, stage, layout=layout, notes=notes, **info)


def load_quantized(path: Path, card: dict, model: ModelParams, shell: Callable[[str, nn.Module], nn.Module]):
    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    net = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model.trust_remote_code)
    for name, kind in card["layout"].items():
        set_module(net, name, shell(kind, net.get_submodule(name)))
    net.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    return net.eval(), load_tokenizer(str(path), model)


def save_int8(model, tokenizer, out: Path, variant: str, layout: dict[str, str], notes: list[str], stage: str = "ptq", **info) -> None:
    save_quantized(model, tokenizer, out, variant, "int8", layout, notes, stage, **info)


def load_int8(path: Path, card: dict, model: ModelParams):
    return load_quantized(path, card, model, int8_shell)
