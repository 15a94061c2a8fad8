"""Storage of models holding lowbit's quantized modules: plain safetensors plus a layout on the card.

    save_quantized(model, tokenizer, out, "ptq_int8_dynamic", "int8", layout, notes)
    model, tokenizer = load_quantized(out, card, model_params, int8_shell)

The directory holds the model config, the tokenizer, model.safetensors (the modules' own
buffers: int8 or packed int4 weights with their scales, calibrated activation qparams),
and a card whose `layout` names each quantized module ({module: kind}). Loading builds the
float architecture from the config, puts an empty shell of the right kind where the layout
says (`shell(kind, float_module)`), and loads the state dict strictly (a tensor tied to another one,
listed under the card's `tied`, is stored once and tied again).

The `int8` format (save_int8 / load_int8) is used by ptq's int8 schemes, qat and merged
adapters re-quantized to int8; the int4 scheme uses the same mechanism with its own shells.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from lowbit.errors import LowbitError
from lowbit.models import load_tokenizer
from lowbit.quant.ptq import int8_shell, set_module
from lowbit.task_types import task_type
from lowbit.variants import write_card

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams


def save_quantized(model, tokenizer, out: Path, variant: str, fmt: str, layout: dict[str, str], notes: list[str],
                   stage: str = "ptq", **info) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tensors, tied = {}, {}
    seen: dict[tuple[int, int], str] = {}
    for name, tensor in model.state_dict().items():
        # tied weights (a chat model's lm_head is its embedding table) share one storage: safetensors
        # refuses to write it twice, so the second name is recorded on the card and tied again on load
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()) if not tensor.is_quantized else (id(tensor), 0)
        if key in seen and key[1]:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.contiguous()
    save_file(tensors, out / "model.safetensors")
    write_card(out, variant, fmt, stage, layout=layout, notes=notes, tied=tied, **info)


def load_quantized(path: Path, card: dict, model: ModelParams, shell: Callable[[str, nn.Module], nn.Module]):
    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    net = task_type(model).AUTO_MODEL.from_config(config, trust_remote_code=model.trust_remote_code)
    for name, kind in card["layout"].items():
        set_module(net, name, shell(kind, net.get_submodule(name)))
    missing, unexpected = net.load_state_dict(load_file(path / "model.safetensors"), strict=False)
    untied = set(missing) - set(card.get("tied", {}))
    if untied or unexpected:
        raise LowbitError(f"{path / 'model.safetensors'}: does not fit the layout on its card (missing: {sorted(untied)[:5]}, "
                          f"unexpected: {sorted(unexpected)[:5]}); produce the variant again (lowbit run)")
    for name, source in card.get("tied", {}).items():  # the same storage again, as when it was saved
        owner, _, attribute = name.rpartition(".")
        setattr(net.get_submodule(owner), attribute, net.get_parameter(source) if source in dict(net.named_parameters())
                else net.get_buffer(source))
    return net.eval(), load_tokenizer(str(path), model)


def save_int8(model, tokenizer, out: Path, variant: str, layout: dict[str, str], notes: list[str], stage: str = "ptq", **info) -> None:
    save_quantized(model, tokenizer, out, variant, "int8", layout, notes, stage, **info)


def load_int8(path: Path, card: dict, model: ModelParams):
    return load_quantized(path, card, model, int8_shell)
