"""Measurements: memory held by a model, bytes on disk, peak RSS, latency, throughput.

Every figure is measured. Derived figures say how:
- bits_per_param = 8 × weight_bytes / total_params (storage bits per parameter, scales included);
- train_memory_bytes = weight_bytes of the model being trained + the RSS growth during
  training (peak RSS − RSS at its start, after freed heap is handed back): the memory
  training needs, without the libraries the process has imported.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lowbit.io import tree_bytes

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer as held in memory, each storage counted once.

    Quantized storage counts as what it is: int8 weights 1 byte each, packed 4-bit
    weights half a byte, plus their scales and zero points (they are buffers or
    parameters too). Tied tensors (shared storage) are counted once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for m in model.modules() for t in _extra_tensors(m)]
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()) if not tensor.is_quantized else (id(tensor), 0)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size() if tensor.is_quantized else tensor.untyped_storage().nbytes()
    return total


def _extra_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors a module holds outside parameters/buffers: packed int8 kernels' weights
    (lowbit_extra_tensors) and bitsandbytes' quantization state (NF4 block scales, LLM.int8 row scales)."""
    hook = getattr(module, "lowbit_extra_tensors", None)
    tensors = list(hook()) if callable(hook) else []
    for param in module.parameters(recurse=False):
        tensors += _bnb_state_tensors(param)
    return tensors


def _bnb_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    state = getattr(param, "quant_state", None)
    tensors = [t for t in state.as_dict(packed=True).values() if torch.is_tensor(t)] if state is not None else []
    scb = getattr(param, "SCB", None)
    return tensors + ([scb] if torch.is_tensor(scb) else [])


def quantized_weight_stats(model: torch.nn.Module) -> tuple[int, int]:
    """(quantized weight count, bytes they occupy with their scales) over int8 and bitsandbytes layers.

    `quantized_bits_per_param` = 8 × bytes / count: the storage cost of one quantized
    weight (about 4.13 for NF4 with double quantization at block size 64, 8.25 for int8 per row).
    """
    count = held = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if callable(own := getattr(module, "quantized_weight_stats", None)):  # lowbit's quantized modules say it themselves
            module_count, module_bytes = own()
            count, held = count + module_count, held + module_bytes
        elif torch.is_tensor(weight) and (state := _bnb_state_tensors(weight)):
            count += logical_numel(weight)
            held += weight.untyped_storage().nbytes() + sum(t.numel() * t.element_size() for t in state)
    return count, held


def logical_numel(param: torch.Tensor) -> int:
    """Weights a parameter stands for: bitsandbytes 4-bit packs two per byte and keeps the original shape aside."""
    state = getattr(param, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else param.numel()


def bits_per_param(weight_bytes_: int, total_params: int) -> float:
    return 8.0 * weight_bytes_ / total_params if total_params else float("nan")


def disk_bytes(path: str | Path) -> int:
    return tree_bytes(path)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers only what follows.

    Linux ≥ 4.0 resets it when "5" is written to /proc/self/clear_refs. Returns False
    where that is not possible; peak_rss_bytes then reports the process-lifetime peak.
    """
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Hand freed heap back to the kernel, so RSS shows what is live rather than what the
    allocator kept from earlier work (loading a model, quantizing it). glibc only; a
    no-op elsewhere."""
    gc.collect()
    return_free_pages()


def return_free_pages() -> bool:
    """malloc_trim(0): glibc hands every whole free page of its heaps back to the kernel, the holes
    between live blocks included, not only the top. Without release_free_heap's garbage collection,
    which costs tens of milliseconds with torch loaded: cheap enough for every training step.
    False where malloc is not glibc's."""
    if (libc := _glibc()) is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.cache  # looked up once: training calls return_free_pages after every step
def _glibc() -> ctypes.CDLL | None:
    """glibc, for its malloc controls (malloc_trim, mallopt); None where malloc is another library's."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


# mallopt's parameter numbers (glibc's malloc.h) and glibc's start-up trim threshold
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024


def set_mmap_threshold(size: int) -> bool:
    """Serve every block of `size` bytes or more that the heap cannot hold with a mapping of its
    own, unmapped when freed, for the rest of the process (glibc keeps no way back to its
    self-adjusting threshold; lowbit.hardware.training_mmap_threshold says why training wants it).

    glibc raised its trim threshold along with the mmap one (to twice it); it goes back to its
    start-up value, so the process is as `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=<size>`
    would have started it, the setting the figures were measured with. Call release_free_heap
    next: blocks come from the heap while it has room. False where malloc is not glibc's."""
    if (libc := _glibc()) is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, size)) and bool(libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD))


def current_rss_bytes() -> int:
    """Resident memory now; 0 where /proc is unavailable, so training-memory growth then spans
    the process's lifetime peak, as peak_rss_bytes does there."""
    try:
        return _status_kib("VmRSS:") * 1024
    except OSError:
        return 0


def _status_kib(field: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise OSError(f"{_PROC_STATUS} has no {field}")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset_peak_rss() (or process start)."""
    try:
        return _status_kib("VmHWM:") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def time_rounds(call: Callable[[int], object], items: int, rounds: int, warmup: int) -> np.ndarray:
    """Wall-clock milliseconds [rounds, items]: call(i) for every item in turn, `rounds` times over,
    after `warmup` untimed calls (of items 0, 1, ...). Each item's passes are a round apart, so a
    pause that another process causes falls on one pass of an item, not on all of them."""
    for i in range(warmup):
        call(i % items)
    times = np.empty((rounds, items))
    for r in range(rounds):
        for i in range(items):
            start = time.perf_counter()
            call(i)
            times[r, i] = (time.perf_counter() - start) * 1000.0
    return times


def latency_summary(times_ms: np.ndarray) -> dict[str, float]:
    """p50 and p95 over the items of each item's fastest round (times_ms [rounds, items], as time_rounds
    returns): the fastest pass is the item's own cost, without the pauses other processes put into some."""
    fastest = times_ms.min(axis=0)
    return {
        "latency_ms_p50": float(np.percentile(fastest, 50)),
        "latency_ms_p95": float(np.percentile(fastest, 95)),
    }
