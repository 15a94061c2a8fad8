"""LoRA and QLoRA through PEFT and bitsandbytes: construction, merge-aware export, loading.

LoRA:  W = W0 + (alpha / r) · B · A, with W0 [d×k] frozen, B [d×r] zero-initialised and
       A [r×k] trained; a classifier's new head is trained in full (`modules_to_save`), a causal
       LM's tied head is not (lowbit.task_types: HEAD, ADAPTER_TRAINED_IN_FULL).
QLoRA: W0 held in 4-bit NF4 with double-quantized block scales (bitsandbytes), the
       matmul computed in bf16/fp16, adapters in full precision.

    model = lora_model(base, params.lora, "lora", params.model.task)   # PEFT-wrapped, only adapters (+ head) trainable
    model = lora_model(load_4bit_base(...), params.qlora, "qlora", params.model.task)   # QLoRA
    merged = merged_model(peft_model, fp32_base)                # W0 (dequantized for QLoRA) + (alpha/r)·B·A
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from lowbit.config import LoraParams, ModelParams, QLoraParams
from lowbit.errors import LowbitError
from lowbit.hardware import detect, device_map, nf4_compute_dtype, qlora_compute_dtype, training_optimizer
from lowbit.io import read_json
from lowbit.models import load_tokenizer, resolve_model, save_model
from lowbit.quant.ptq import quantizable_layers, quantize_int8
from lowbit.quant.bnb import nf4_config, require_bitsandbytes, set_4bit_layouts
from lowbit.quant.storage import save_int8
from lowbit.task_types import load_model, task_type
from lowbit.variants import write_card

def linear_layer_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def lora_config(params: LoraParams, task: str = "sequence_classification") -> LoraConfig:
    kind = task_type(task)
    return LoraConfig(
        task_type=kind.PEFT_TASK, r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout,
        target_modules=params.target_modules, bias=params.bias, modules_to_save=kind.ADAPTER_TRAINED_IN_FULL,
    )


def lora_model(base: nn.Module, params: LoraParams, section: str = "lora", task: str = "sequence_classification") -> PeftModel:
    if params.target_modules != "all-linear":
        names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
        if not names & set(params.target_modules):
            raise LowbitError(
                f"params.yaml: {section}.target_modules: {params.target_modules} match no layer of the model; "
                f"its linear layers are: {', '.join(linear_layer_names(base))} (or use all-linear)"
            )
    return get_peft_model(base, lora_config(params, task))


def load_4bit_base(source: str, model: ModelParams, meta: dict, params: QLoraParams) -> nn.Module:
    """The pretrained model with every Linear but the head in NF4, ready for k-bit training."""
    require_bitsandbytes()
    caps = detect()
    kind = task_type(model)
    config = nf4_config(kind.HEAD, qlora_compute_dtype(params.compute_dtype, caps)[0])
    base = kind.load_pretrained(source, model, meta, quantization_config=config, device_map=device_map(caps))
    set_4bit_layouts(base, training=True)  # the validation passes between epochs must not repack it
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=params.gradient_checkpointing)


def optimizer_choice(params: LoraParams) -> tuple[str, str, object]:
    """(name, why, factory): lowbit.hardware.training_optimizer's choice, built on the params."""
    name, why = training_optimizer(detect())
    if name == "PagedAdamW8bit":
        import bitsandbytes as bnb

        factory = lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=params.learning_rate, weight_decay=params.weight_decay)  # noqa: E731
    else:
        factory = lambda ps: torch.optim.AdamW(ps, lr=params.learning_rate, weight_decay=params.weight_decay)  # noqa: E731
    return name, why, factory


def dequantized_4bit_weights(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """{module name in the plain model: fp32 weight} for every 4-bit layer: exactly the W0 QLoRA trained against."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    weights = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            plain = name.removeprefix("base_model.model.").removesuffix(".base_layer")
            weights[plain] = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float().cpu()
    return weights


def merged_model(adapter_dir: Path, base: nn.Module, base_weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Merge a saved adapter into an fp32 base: W0 + (alpha/r)·B·A, head from the adapter.

    `base_weights` replaces W0 first (QLoRA: the dequantized NF4 weights), so that the
    merge adds the adapters to the weights they were trained with.
    """
    with torch.no_grad():
        for name, weight in (base_weights or {}).items():
            base.get_submodule(name).weight.copy_(weight)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def load_adapter_model(path: Path, card: dict, model: ModelParams):
    """A saved adapter on its base: the fp32 pretrained model (LoRA) or the same in NF4 (QLoRA)."""
    meta = {"labels": card["labels"]}
    kind = task_type(model)
    source = resolve_model(card["base_model"])
    check_adapter_base(path, card)
    if card.get("base_quantization") == "nf4":
        require_bitsandbytes()
        config = nf4_config(kind.HEAD, getattr(torch, card["compute_dtype"]))
        base = kind.load_pretrained(source, model, meta, quantization_config=config, device_map=device_map(detect()))
        set_4bit_layouts(base, training=False)
    else:
        base = kind.load_pretrained(source, model, meta)
    return PeftModel.from_pretrained(base, str(path)).eval(), load_tokenizer(str(path), model)


def check_adapter_base(path: Path, card: dict) -> None:
    config = read_json(path / "adapter_config.json")
    recorded = config.get("base_model_name_or_path")
    expected = resolve_model(card["base_model"])
    if recorded and Path(recorded).resolve() != Path(expected).resolve() and recorded != card["base_model"]:
        raise LowbitError(
            f"{path}: this adapter was trained on base {recorded!r}, but its card says {card['base_model']!r} "
            f"({expected}); train it again on that base (lowbit run) or point model.name at {recorded!r}"
        )


def requantize(
    merged: nn.Module, tokenizer, out: Path, variant: str, stage: str, how: str, model: ModelParams, info: dict
) -> None:
    """Save the merged model as fp32 (`none`), NF4 (bitsandbytes) or int8 (lowbit, dynamic W8A8)."""
    head = task_type(model).HEAD
    if how == "int8":
        layout = quantize_int8(merged, "dynamic", quantizable_layers(merged, head, embeddings=True))
        save_int8(merged, tokenizer, out, variant, layout, ["adapters merged, then int8 (dynamic)"], stage=stage, **info)
        return
    save_model(merged, tokenizer, out)
    if how == "nf4":
        config = nf4_config(head, nf4_compute_dtype(detect())[0])
        nf4 = load_model(out, model, quantization_config=config, device_map="cpu")
        save_model(nf4, tokenizer, out)
        write_card(out, variant, "bnb", stage, device="cpu", notes=["adapters merged, then NF4 (bitsandbytes)"], **info)
        return
    into = "the dequantized NF4 weights they were trained against, in fp32" if stage == "qlora" else "fp32 weights"
    write_card(out, variant, "hf", stage, notes=[f"adapters merged into {into}"], **info)
