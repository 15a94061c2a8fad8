"""Post-training quantization: pick layers, calibrate activation ranges, swap in int8 modules.

    layers = quantizable_layers(model, skip=["classifier"])
    ranges = calibrate(model, calib_batches, layers, observer="percentile")
    quantize_int8(model, "static", layers, ranges)          # in place: W8A8 with calibrated ranges

Embedding tables are quantized too (per-row int8) when `embeddings=True`: in MiniLM
they hold over half of the parameters.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.modules import Int8Embedding, Int8Linear
from lowbit.quant.observers import make_observer


EMPTY_CALIBRATION = "calibration: the calib split is empty; raise prepare.calib_size"


def matches(name: str, patterns: list[str]) -> bool:
    """A module matches a pattern by glob or as a prefix: 'classifier', 'bert.encoder.layer.5.*'."""
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def quantizable_layers(model: nn.Module, skip: list[str], embeddings: bool = False) -> dict[str, nn.Module]:
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds) and not matches(n, skip)}
    if not any(isinstance(m, nn.Linear) for m in layers.values()):
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise LowbitError(
            f"no quantizable nn.Linear layers left (ptq.skip_modules={skip}); the model's linear layers: "
            f"{', '.join(linear) or 'none'}"
        )
    return layers


def linear_names(layers: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in layers.items() if isinstance(m, nn.Linear)]


@torch.no_grad()
def calibrate(model: nn.Module, batches, layers: list[str], observer: str, percentile: float = 99.99) -> dict:
    """Run calibration batches; return {layer: ((in_scale, in_zp), (out_scale, out_zp))}."""
    modules = dict(model.named_modules())
    inputs = {n: make_observer(observer, f"{n} (input)", percentile) for n in layers}
    outputs = {n: make_observer(observer, f"{n} (output)", percentile) for n in layers}
    hooks = []
    for name in layers:
        hooks.append(modules[name].register_forward_pre_hook(lambda m, args, n=name: inputs[n].observe(args[0])))
        hooks.append(modules[name].register_forward_hook(lambda m, args, out, n=name: outputs[n].observe(out)))
    model.eval()
    try:
        count = 0
        for batch in batches:
            batch = {k: v for k, v in batch.items() if k != "labels"}
            model(**batch)
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise LowbitError(EMPTY_CALIBRATION)
    return {n: (inputs[n].qparams(), outputs[n].qparams()) for n in layers}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_int8(model: nn.Module, mode: str, layers: dict[str, nn.Module], ranges: dict | None = None) -> dict[str, str]:
    """Replace each layer by its int8 counterpart in place; returns {name: kind} for the card."""
    done = {}
    for name, module in layers.items():
        if isinstance(module, nn.Embedding):
            set_module(model, name, Int8Embedding.from_float(module))
            done[name] = "embedding"
        else:
            in_q, out_q = ranges[name] if mode == "static" else (None, None)
            set_module(model, name, Int8Linear.from_float(module, mode, in_q, out_q))
            done[name] = f"linear:{mode}"
    return done


def int8_shell(kind: str, float_module: nn.Module) -> nn.Module:
    """An empty int8 module of the layout's kind ("embedding" or "linear:<mode>") in the float one's
    place, so a saved int8 state dict loads strictly (lowbit.quant.storage.load_quantized)."""
    if kind == "embedding":
        return Int8Embedding(float_module.num_embeddings, float_module.embedding_dim, float_module.padding_idx)
    mode = kind.split(":", 1)[1]
    return Int8Linear(float_module.in_features, float_module.out_features, mode, float_module.bias is not None)
