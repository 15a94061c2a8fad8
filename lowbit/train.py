"""One training loop shared by baseline, qat, lora and qlora.

    result = train(model, tokenizer, splits.train, splits.val, params.baseline, max_length=64)

AdamW with linear warmup/decay, gradient clipping, seeded shuffling, validation
after every epoch, and the best-on-validation weights restored at the end.
Variants differ only in the model they pass in (fake-quantized, PEFT-wrapped, 4-bit)
and in the optional `on_step` hook (QAT freezes its observers there).

Every stage that trains or calibrates runs inside `determinism(...)` (params.yaml's
`determinism` section) and records what it applied in its result.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from lowbit.config import DeterminismParams, TrainParams
from lowbit.errors import LowbitError
from lowbit.hardware import (
    Capabilities, detect, determinism_environment, training_mmap_threshold, training_trims_heap_each_step,
)
from lowbit.measure import (
    current_rss_bytes, peak_rss_bytes, release_free_heap, reset_peak_rss, return_free_pages, set_mmap_threshold,
    weight_bytes,
)
from lowbit.models import model_device
from lowbit.task_types import task_type


def progress_disabled() -> bool | None:
    """tqdm's `disable`: None lets tqdm decide (bars on a terminal only); CI logs stay quiet."""
    return True if os.environ.get("CI") else None


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_determinism(cfg: DeterminismParams, seed: int, caps: Capabilities) -> dict[str, int]:
    """Set this process up as params.yaml's `determinism` says, seed it, and return what was
    applied: {"deterministic": 0 or 1, "torch_threads": the intra-op thread count now in use},
    for the stage's result and MLflow. Stages use it through `determinism`, first, before any
    model is built.

    With `enabled`, torch must use deterministic algorithms, strictly (warn_only=False): on CPU
    no op that lowbit's training uses raises (baseline, qat, lora and qlora, and ptq's
    calibration and every scheme's build, were run under it), so an op that would break the
    bit-identical guarantee (one added later, or a CUDA kernel that accumulates atomically)
    stops the stage with its name instead of passing unnoticed; `train` says which key turns it
    off. The one alert seen, int8 inference, is a false alarm handled by `int8_inference_allowed`.
    The thread count matters on CPU too: the order of large reductions follows it (LayerNorm
    weight gradients of MiniLM differed between 1 and 2 threads here), so a fixed
    `num_threads` makes runs agree across machines whose default differs.
    """
    for key, value in determinism_environment(cfg.enabled, caps).items():
        os.environ.setdefault(key, value)  # a valid value set by the user (":16:8") is kept; torch names an invalid one
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    torch.use_deterministic_algorithms(cfg.enabled)
    seed_everything(seed)
    return {"deterministic": int(torch.are_deterministic_algorithms_enabled()), "torch_threads": torch.get_num_threads()}


@contextlib.contextmanager
def determinism(cfg: DeterminismParams, seed: int, caps: Capabilities) -> Iterator[dict[str, int]]:
    """`apply_determinism` for the block; torch's mode and thread count are put back after it.

    Stages run as processes of their own, but their `run` functions are also called in-process
    (tests, notebooks, `lowbit stage`): a deterministic mode left on there would make a later,
    unrelated int8 call raise (see `int8_inference_allowed`)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.get_num_threads())
    try:
        yield apply_determinism(cfg, seed, caps)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])


@contextlib.contextmanager
def int8_inference_allowed():
    """Run torch's int8 CPU kernels in a process in deterministic mode: the mode is off inside the block.

    `quantized::linear` resizes its quantized output tensor, and torch flags every quantized
    resize as nondeterministic (`quantized_resize_cpu_`: grown memory it cannot fill with NaN);
    the GEMM then writes every output element, so the result does not depend on that memory.
    Not warn_only: torch then prints its warning on every call, thousands of lines for one pass
    over the layers.
    """
    mode = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])


@contextlib.contextmanager
def nondeterministic_ops_named():
    """Torch's error for an op without a deterministic algorithm, with the params key that allows it."""
    try:
        yield
    except RuntimeError as err:
        if "does not have a deterministic implementation" not in str(err):
            raise
        op = str(err).split(" does not have")[0]
        raise LowbitError(
            f"{op} has no deterministic implementation on this machine, and params.yaml determinism.enabled is true; "
            "set determinism.enabled: false to train with it (two runs may then differ in the last bits)"
        ) from err


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: trainable parameters and buffers (e.g. QAT observer ranges).

    Frozen (possibly 4-bit) base weights are left out: they do not change, and a
    quantized state dict cannot be loaded back through load_state_dict."""
    tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return tensors | dict(model.named_buffers())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in trained_tensors(model).items()}


@torch.no_grad()
def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in trained_tensors(model).items():
        tensor.copy_(state[name])


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the model (as measure.weight_bytes counts them), its gradients and the optimizer state."""
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
    return weight_bytes(model) + grads + states


@dataclass
class TrainResult:
    best_epoch: int
    best_val_accuracy: float
    train_samples_s: float
    train_seconds: float
    peak_rss_bytes: int          # peak resident memory of the process while training (libraries included)
    peak_rss_growth_bytes: int   # that peak minus the RSS when training started: gradients, optimizer, activations
    train_memory_bytes: int      # derived: weight_bytes of the trained model + peak_rss_growth_bytes
    train_state_bytes: int       # weights + gradients + optimizer state, summed over the tensors at the last step
    malloc_mmap_threshold_bytes: int | None  # set for training (hardware.training_mmap_threshold); None: malloc's own
    malloc_trim_each_step: bool  # free heap pages handed back after every step (hardware.training_trims_heap_each_step)
    history: list[dict] = field(default_factory=list)

    def figures(self) -> dict:
        """What every training stage records in its result and MLflow (train_ prefix there)."""
        return {
            "best_epoch": self.best_epoch, "best_val_accuracy": self.best_val_accuracy, "history": self.history,
            "train_samples_s": self.train_samples_s, "train_seconds": self.train_seconds,
            "peak_rss_bytes": self.peak_rss_bytes, "peak_rss_growth_bytes": self.peak_rss_growth_bytes,
            "train_memory_bytes": self.train_memory_bytes, "train_state_bytes": self.train_state_bytes,
            "malloc_mmap_threshold_bytes": self.malloc_mmap_threshold_bytes,
            "malloc_trim_each_step": self.malloc_trim_each_step,
        }


def train(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, train_frame: pd.DataFrame, val_frame: pd.DataFrame,
    cfg: TrainParams, max_length: int, optimizer_factory: Callable | None = None,
    on_step: Callable[[int], None] | None = None, task: str = "sequence_classification",
) -> TrainResult:
    """`task` (params.yaml model.task) decides how examples are batched and what the validation score is:
    accuracy for a classifier, target-token accuracy for a causal LM (lowbit.task_types)."""
    kind = task_type(task)
    caps = detect()
    threshold = training_mmap_threshold(caps, os.environ.get("GLIBC_TUNABLES", ""))
    if threshold is not None and not set_mmap_threshold(threshold):
        threshold = None
    trim_each_step = training_trims_heap_each_step(caps)
    release_free_heap()  # what loading the model took and then freed is not counted as training memory
    reset_peak_rss()
    start_rss = current_rss_bytes()
    seed_everything(cfg.seed)
    loader = kind.make_loader(tokenizer, train_frame, cfg.batch_size, max_length, shuffle=True, seed=cfg.seed,
                              group_by_length=cfg.group_by_length)
    val_loader = kind.make_loader(tokenizer, val_frame, cfg.batch_size * 2, max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    make_optimizer = optimizer_factory or (lambda ps: torch.optim.AdamW(ps, lr=cfg.learning_rate, weight_decay=cfg.weight_decay))
    optimizer = make_optimizer(params)
    total_steps = cfg.epochs * len(loader)
    schedule = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    device = model_device(model)

    best_state, best, history, step, samples, seconds = None, (-1.0, 0), [], 0, 0, 0.0
    with nondeterministic_ops_named():  # determinism.enabled: an op without a deterministic algorithm names the key
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            epoch_start = time.perf_counter()
            losses = []
            for batch in tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=progress_disabled(), leave=False):
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                schedule.step()
                state_bytes = training_state_bytes(model, optimizer)
                optimizer.zero_grad(set_to_none=True)
                if trim_each_step:  # this step's activations and gradients are free now
                    return_free_pages()
                losses.append(loss.item())
                samples += len(batch["input_ids"])
                step += 1
                if on_step:
                    on_step(step)
            seconds += time.perf_counter() - epoch_start  # training only: validation is not in train_samples_s
            val_accuracy = kind.validation_score(model, val_loader)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val_accuracy})
            if val_accuracy > best[0]:
                best = (val_accuracy, epoch)
                if epoch < cfg.epochs:  # the last epoch is kept as it is: its copy would never be restored
                    best_state = snapshot(model)
    if best[1] != cfg.epochs:
        restore(model, best_state)
    peak = peak_rss_bytes()
    growth = peak - start_rss
    return TrainResult(best[1], best[0], samples / seconds, seconds, peak, growth,
                       weight_bytes(model) + growth, state_bytes, threshold, trim_each_step, history)
