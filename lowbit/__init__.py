"""lowbit: make fine-tuned transformers cheaper, measurably and reproducibly.

The library layer: usable from a notebook with no Prefect, DVC or MLflow import (a test checks).
Stage bodies live in tasks/; the command line, flows, DVC glue and tracking in flows/.
"""

import logging

__version__ = "0.1.0"

# transformers and peft import torchao when it is installed; its optional CUDA/mxfp8 kernels
# fail to load on CPU machines and it re-registers enums torch already knows: both expected,
# both logged as warnings on every import. Errors still show.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

# On AVX512-BF16 CPUs bitsandbytes tries, at import, to fetch an optional faster 4-bit GEMM from
# the Hugging Face Hub (`kernels-community`) and warns when it cannot. lowbit runs offline and
# bitsandbytes falls back to its own fused kernel, so the message is noise. Set here, before peft
# or transformers can import bitsandbytes; its logger only, so its other warnings still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# LLM.int8 (ptq_int8_bnb) multiplies in fp16 by design, and bitsandbytes logs that it casts the fp32
# inputs on every call of every layer: 43,000 lines in one evaluation of a 135M chat model. That one
# message is dropped; the module's other warnings still show.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropMessage("MatMul8bitLt: inputs will be cast"))
