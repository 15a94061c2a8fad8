"""What this machine can do, and every decision lowbit makes from it.

    caps = detect()                                  # read once from torch and /proc/cpuinfo
    dtype, why = qlora_compute_dtype("auto", caps)   # a pure function of the capabilities

Machines differ: AVX2-only CPUs, AVX512-BF16/VNNI CPUs, AMX CPUs, CUDA GPUs. Libraries
branch on these flags on their own (bitsandbytes repacks 4-bit weights on AVX512-BF16,
oneDNN picks int8 kernels by VNNI/AMX), so a path tested only on one CPU kind breaks on
another. Here every decision that depends on the hardware is a pure function of an
injected `Capabilities`; tests call each with every answer (tests/unit/test_hardware.py).

The decisions:
- `qlora_compute_dtype`     the dtype QLoRA's 4-bit matmuls compute in (`qlora.compute_dtype: auto`)
- `nf4_compute_dtype`       the dtype a loaded ptq_nf4 model computes in, chosen where it is loaded
- `training_optimizer`      paged 8-bit AdamW on CUDA, plain AdamW on CPU
- `device_map`              where a bitsandbytes model is loaded
- `bnb_cpu_repack`          whether a 4-bit layer may use bitsandbytes' AVX512-BF16 inference layout
- `int8_kernel_family`      which x86 int8 instructions the int8 kernels get (reported, not chosen)
- `evaluation_threads`      torch intra-op threads while evaluating
- `determinism_environment` what deterministic training needs in the environment (cuBLAS workspace on CUDA)
- `training_mmap_threshold` the size from which training's buffers get their own mmap (glibc's malloc only)

Deliberately not hardware-conditional: int8 activations always use 7-bit ranges
(`reduce_range`). A saved int8 model travels (DVC cache, MLflow registry) to CPUs of
other kinds, and on one without VNNI full 8-bit activations saturate the u8×s8 pair products.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# The flags that change what lowbit or its libraries do; the rest of /proc/cpuinfo is noise here.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Capabilities:
    cuda: bool = False
    cuda_bf16: bool = False                            # CUDA device with native bf16 (Ampere or newer)
    cpu_capability: str = "DEFAULT"                    # torch's ATen dispatch level: DEFAULT, AVX2, AVX512
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # RELEVANT_FLAGS present in /proc/cpuinfo
    cpu_bf16_matmul: bool = False                      # oneDNN multiplies bf16 natively (AVX512-BF16 or AMX)
    cores: int = 1                                     # torch's default intra-op threads
    libc: str = ""                                     # the C library malloc comes from: "glibc", or "" where unknown

    def describe(self) -> dict:
        """JSON-able summary for results, benchmarks and bug reports."""
        return {
            "cuda": self.cuda, "cuda_bf16": self.cuda_bf16, "cpu_capability": self.cpu_capability,
            "cpu_flags": sorted(self.cpu_flags), "cpu_bf16_matmul": self.cpu_bf16_matmul, "cores": self.cores,
            "libc": self.libc,
            "int8_kernels": int8_kernel_family(self),
        }


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The RELEVANT_FLAGS named on the first `flags` line of a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            present = set(line.partition(":")[2].split())
            return frozenset(flag for flag in RELEVANT_FLAGS if flag in present)
    return frozenset()


@functools.lru_cache(maxsize=1)
def detect() -> Capabilities:
    """This process's machine (cached: the hardware does not change while it runs)."""
    cuda = torch.cuda.is_available()
    try:
        flags = cpu_flags(CPUINFO.read_text())
    except OSError:  # not Linux: torch's dispatch level still says AVX2 / AVX512
        flags = frozenset()
    return Capabilities(
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_flags=flags,
        cpu_bf16_matmul=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        cores=torch.get_num_threads(),
        libc=platform.libc_ver()[0],
    )


def qlora_compute_dtype(setting: str, caps: Capabilities) -> tuple[torch.dtype, str]:
    """The dtype 4-bit matmuls compute in, and why.

    An explicit float32/bfloat16/float16 is taken as set: bitsandbytes trains with each on
    CPU and CUDA. `auto` takes bf16 where the hardware multiplies it natively, fp16 on a
    CUDA device without bf16, and fp32 on a CPU without native bf16, where emulated bf16
    matmuls measured 35x slower than fp32.
    """
    if setting != "auto":
        return getattr(torch, setting), "set by qlora.compute_dtype"
    if caps.cuda:
        if caps.cuda_bf16:
            return torch.bfloat16, "auto: CUDA device with bf16"
        return torch.float16, "auto: CUDA device without bf16"
    if caps.cpu_bf16_matmul:
        return torch.bfloat16, "auto: CPU with native bf16 matmuls"
    return torch.float32, "auto: this CPU has no native bf16 matmul (emulated bf16 is far slower)"


def nf4_compute_dtype(caps: Capabilities) -> tuple[torch.dtype, str]:
    """The dtype a post-training NF4 model (ptq_nf4) computes in, and why: QLoRA's `auto` choice.

    Chosen where the model is loaded, not where it was quantized: its saved 4-bit tensors serve on
    every machine, and no training fixed its numerics. It used to be bf16 everywhere, and on an
    AVX2-only CPU (no native bf16) ptq_nf4 ran at 0.12x FP32's throughput (quant-avx2.json)."""
    return qlora_compute_dtype("auto", caps)


def training_optimizer(caps: Capabilities) -> tuple[str, str]:
    """(optimizer name, why): bitsandbytes' paged optimizers page state through CUDA unified memory."""
    if caps.cuda:
        return "PagedAdamW8bit", "CUDA available: paged 8-bit optimizer states"
    return "AdamW", "no CUDA: bitsandbytes paged optimizers need a GPU"


def device_map(caps: Capabilities) -> str:
    """Where a bitsandbytes model is loaded. A model trained on a GPU still loads on a CPU-only
    machine (its saved 4-bit tensors are device-independent), so this follows the machine, not the card."""
    return "cuda" if caps.cuda else "cpu"


# bitsandbytes' AVX512-BF16 layout interleaves rows in blocks of 32 and keeps one absmax per
# quantization block of each row (functional._convert_weight_packed_for_cpu).
BNB_REPACK_ROW_BLOCK = 32


def bnb_cpu_repack(bnb_has_kernel: bool, training: bool, compute_dtype: torch.dtype | None,
                   out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether a 4-bit layer may switch to bitsandbytes' fused AVX512-BF16 inference layout.

    bitsandbytes (0.49+, PR #1804) repacks a Linear4bit's weight at its first eval-mode call
    without grad on such CPUs, and never repacks it back when the layer trains again: the
    next training step then takes the inference-only gemv path and fails ("a view of a leaf
    Variable ... in-place operation"; issue #2078 is the same missing inverse for `.to()`).
    It also repacks layers its layout cannot hold: rows not a multiple of 32 or inputs not a
    multiple of the block size fail with "shape '[32, 0]' is invalid". The kernel computes in
    bf16 whatever the layer's compute dtype (it casts the input), so a layer set to compute in
    float32 or float16 is not repacked: it computes in the dtype it says. So: inference only,
    where bitsandbytes has the kernel, for bf16 layers, and only for shapes the layout fits.
    """
    fits = out_features % BNB_REPACK_ROW_BLOCK == 0 and in_features % blocksize == 0
    return bnb_has_kernel and not training and compute_dtype == torch.bfloat16 and fits


def int8_kernel_family(caps: Capabilities) -> str:
    """The instructions x86 int8 GEMMs get here (oneDNN and fbgemm choose by these flags):
    AMX tiles, AVX512-VNNI/AVX-VNNI dot products, or AVX2 pair products that saturate at int16."""
    if "amx_int8" in caps.cpu_flags:
        return "amx"
    if caps.cpu_flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    if "avx2" in caps.cpu_flags or caps.cpu_capability in ("AVX2", "AVX512"):
        return "avx2"
    return "generic"


def evaluation_threads(setting: int, caps: Capabilities) -> int:
    """evaluate.num_threads, or 0 = every core torch would use by default."""
    return setting if setting > 0 else caps.cores


# Training's largest buffers, activations and their gradients, are 1-25 MiB at the defaults
# (MiniLM, batch 32, up to 64 tokens: a 384-wide hidden state of 32 x 64 tokens is 3 MiB).
TRAINING_MMAP_THRESHOLD = 2 * 2**20


def training_mmap_threshold(caps: Capabilities, glibc_tunables: str) -> int | None:
    """The malloc mmap threshold training sets (bytes), or None to leave malloc as it is.

    glibc serves an allocation above its mmap threshold with a mapping of its own, and each time
    such a mapping is freed it raises the threshold to that size (up to 32 MiB). After the first
    steps every activation therefore comes from the heap, and as dynamic padding changes their
    sizes from batch to batch, the holes freed by one batch fit the next one less and less: the
    training peak grew with the number of steps (SST-2, max length 64, one baseline epoch,
    2-core EPYC: 1,530 / 1,779 / 1,884 MiB at 1,000 / 6,000 / 16,000 rows). A fixed 2 MiB
    threshold, which also stops glibc raising it, hands those buffers back at every free:
    1,527 MiB at 6,000 rows and 1,580 at 16,000, for 9.8% and 9.5% more training time (set
    from process start by GLIBC_TUNABLES: 1,416 / 1,544 / 1,577 MiB). 1 MiB peaked at 1,365 MiB
    but took 40% longer (a mapping per small buffer costs page faults); 4 and 8 MiB kept 1,725
    and 1,739 MiB at 6,000 rows.
    glibc only (mallopt). A threshold the user set in GLIBC_TUNABLES is theirs and is kept.
    """
    if caps.libc != "glibc" or "glibc.malloc.mmap_threshold" in glibc_tunables:
        return None
    return TRAINING_MMAP_THRESHOLD


def training_trims_heap_each_step(caps: Capabilities) -> bool:
    """Whether training hands the heap's free pages back to the kernel after every optimizer step.

    Buffers under the mmap threshold (2 MiB above) still come from the heap, and their sizes change
    with every batch's padded length, so the holes between live blocks grow with the number of
    steps; pages in those holes stay resident. malloc_trim(0) after each step returns every free
    page, so a step's peak is what that step holds (SST-2, max length 64, one baseline epoch,
    2-core EPYC, with the 2 MiB threshold: 1,416 / 1,527 / 1,580 MiB at 1,000 / 6,000 / 16,000
    rows before, 1,348 / 1,412 / 1,421 after, for 5-13% more training time as the next step
    faults those pages in again). Every 8th step kept 1,502 MiB at 6,000 rows: the holes of a
    few steps already add up. Without the fixed threshold, trimming alone kept 1,633 MiB: the
    two together are what keeps the peak flat. glibc only (malloc_trim).
    """
    return caps.libc == "glibc"


# A fixed cuBLAS workspace: 8 buffers of 4 MiB (":16:8", smaller and slower, works too).
CUBLAS_WORKSPACE = ":4096:8"


def determinism_environment(enabled: bool, caps: Capabilities) -> dict[str, str]:
    """Environment variables that deterministic training needs on this machine, to be set before
    the first CUDA matmul.

    On CUDA, cuBLAS (10.2+) splits a GEMM's reduction by whatever workspace its stream gets, so the
    same call can sum in another order; with a fixed CUBLAS_WORKSPACE_CONFIG it does not, and torch
    refuses deterministic mode without one (its first cuBLAS call raises). CPUs need nothing: their
    kernels' order depends on the thread count, which `determinism.num_threads` sets.
    """
    if enabled and caps.cuda:
        return {"CUBLAS_WORKSPACE_CONFIG": CUBLAS_WORKSPACE}
    return {}


def describe_environment() -> dict:
    """detect() plus the torch build: what a result was measured on."""
    return {"torch": torch.__version__, **detect().describe(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
