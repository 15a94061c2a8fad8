"""The `int8` storage format: lowbit's int8 modules saved as plain safetensors.

    save_int8(model, tokenizer, out, "ptq_int8_dynamic", layout, notes)   # layout: {module: "linear:dynamic" | "embedding"}
    model, tokenizer = load_int8(out, card, model_params)

The directory holds the model config, the tokenizer, a safetensors file of int8 weights
with fp32 scales (and calibrated activation qparams for static), and a card whose `layout`
names each int8 module. ptq's int8 schemes, qat and merged adapters re-quantized to int8 use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from lowbit.models import load_tokenizer
from lowbit.quant.ptq import restore_int8_modules
from lowbit.variants import write_card

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams


def save_int8(model, tokenizer, out: Path, variant: str, layout: dict[str, str], notes: list[str], stage: str = "ptq", **info) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors")
    write_card(out, variant, "int8", stage, layout=layout, notes=notes, **info)


def load_int8(path: Path, card: dict, model: ModelParams):
    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    net = AutoModelForSequenceClassification.from_config(config, trust_remote_code=model.trust_remote_code)
    restore_int8_modules(net, card["layout"])
    net.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    return net.eval(), load_tokenizer(str(path), model)
