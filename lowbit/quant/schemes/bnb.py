"""bitsandbytes: NF4 (4-bit, double-quantized block scales) and LLM.int8 weights of nn.Linear layers.

Storage format `bnb`: a transformers checkpoint with bitsandbytes' quantized tensors and their
state; loaded with the same quantization config, on the device lowbit.hardware.device_map picks,
its 4-bit layers computing in the dtype lowbit.hardware.nf4_compute_dtype picks for that machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from transformers import BitsAndBytesConfig

from lowbit.hardware import detect, device_map, nf4_compute_dtype
from lowbit.models import load_tokenizer, save_model
from lowbit.task_types import load_model, load_saved
from lowbit.quant.bnb import llm_int8_config, nf4_config, require_bitsandbytes, set_4bit_compute_dtype, set_4bit_layouts
from lowbit.quant.scheme import Scheme, SchemeContext, skip_note
from lowbit.variants import write_card

if TYPE_CHECKING:  # annotations only: the params schema imports the scheme registry to validate
    from lowbit.config import ModelParams

EMBEDDINGS_FP32_NOTE = "embeddings kept in FP32 (bitsandbytes quantizes nn.Linear layers only)"


def quantized_with(variant: str, config: Callable[[list[str]], BitsAndBytesConfig], what: str):
    def build(ctx: SchemeContext) -> list[str]:
        require_bitsandbytes()
        model, tokenizer = load_saved(ctx.baseline_dir, ctx.model, quantization_config=config(ctx.skip_modules),
                                      device_map="cpu")
        out = ctx.out_root / variant
        save_model(model, tokenizer, out)
        write_card(out, variant, "bnb", "ptq", device="cpu", notes=[what, EMBEDDINGS_FP32_NOTE] + skip_note(ctx))
        return [variant]
    return build


def load_bnb(path: Path, card: dict, model: ModelParams):
    require_bitsandbytes()
    caps = detect()
    net = load_model(path, model, device_map=device_map(caps))
    set_4bit_compute_dtype(net, nf4_compute_dtype(caps)[0])  # LLM.int8 has no 4-bit layer: nothing to set
    set_4bit_layouts(net, training=False)
    return net, load_tokenizer(str(path), model)


SCHEMES = (
    Scheme("nf4", quantized_with("ptq_nf4", lambda skip: nf4_config(skip, nf4_compute_dtype(detect())[0]),
                                 "NF4 4-bit weights, double-quantized block scales; computes in bf16 where the "
                                 "CPU or GPU has native bf16, else fp32 (fp16 on a GPU without bf16)"),
           variants=("ptq_nf4",), order=70),
    Scheme("int8_bnb", quantized_with("ptq_int8_bnb", llm_int8_config,
                                      "LLM.int8 weights (bitsandbytes), fp16 matmul with outliers"),
           variants=("ptq_int8_bnb",), order=80),
)
FORMATS = {"bnb": load_bnb}
