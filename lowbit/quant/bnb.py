"""bitsandbytes: the 4-bit (NF4) and LLM.int8 configurations, and 4-bit layers made safe on every CPU.

    config = nf4_config(skip=["classifier"], compute_dtype=torch.bfloat16)
    model = AutoModelForSequenceClassification.from_pretrained(path, quantization_config=config)
    set_4bit_compute_dtype(model, torch.float32)  # optional: another dtype than the saved config's
    set_4bit_layouts(model, training=False)       # before the first forward call

bitsandbytes is imported only inside these functions: importing it takes about 2 s.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from lowbit.errors import LowbitError
from lowbit.hardware import bnb_cpu_repack


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LowbitError("bitsandbytes is not installed; run `make install`, or drop nf4/int8_bnb from ptq.schemes")


def nf4_config(skip: list[str], compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """NF4 weights with double-quantized block scales (QLoRA's storage); `skip` stays in float."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


def llm_int8_config(skip: list[str]) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def four_bit_layers(model: nn.Module) -> list[nn.Module]:
    """The model's bitsandbytes 4-bit layers (none in an LLM.int8 or unquantized model)."""
    import bitsandbytes as bnb

    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def set_4bit_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every 4-bit layer compute in `dtype` (bitsandbytes casts the input and the dequantized
    weight to it) instead of the dtype its saved config names. Call before set_4bit_layouts, which reads it."""
    for layer in four_bit_layers(model):
        layer.compute_dtype = dtype
        layer.compute_type_is_set = True  # else bitsandbytes takes the first input's dtype


def set_4bit_layouts(model: nn.Module, training: bool) -> int:
    """Decide, per 4-bit layer, whether bitsandbytes may repack it for its AVX512-BF16 inference
    kernel (lowbit.hardware.bnb_cpu_repack); returns how many may. Call before the first forward
    call: bitsandbytes repacks at the first eval-mode call and a repacked layer cannot train."""
    import bitsandbytes as bnb

    bnb_has_kernel = bool(bnb.functional.has_avx512bf16())
    allowed = 0
    for module in four_bit_layers(model):
        blocksize = module.weight.quant_state.blocksize if module.weight.quant_state else module.weight.blocksize
        repack = bnb_cpu_repack(bnb_has_kernel, training, module.compute_dtype, module.out_features,
                                module.in_features, blocksize)
        module.support_avx512bf16_for_cpu = repack  # the attribute Linear4bit.forward reads
        allowed += repack
    return allowed
