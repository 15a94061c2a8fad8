"""Per-layer quantization sensitivity: quantize one layer at a time, measure the damage.

    rows = layer_sensitivity(model, layers, ranges, val_loader)
    write_sensitivity(rows, Path("reports"))   # sensitivity.json, sensitivity.md, sensitivity.png

Each layer in turn is swapped for its static W8A8 int8 version (activation ranges
calibrated once on the float model), the validation split is scored, and the layer
is swapped back. accuracy_delta is in points, loss_delta in nats; the most damaging
layers are the candidates for `ptq.skip_modules`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.io import atomic_write_text, write_json
from lowbit.metrics import quality_metrics
from lowbit.quant.modules import Int8Embedding, Int8Linear
from lowbit.quant.ptq import set_module
from lowbit.tables import plt, save_png, sensitivity_table
from lowbit.task_types.sequence_classification import predict_logits


def score(model: nn.Module, loader) -> dict[str, float]:
    logits, labels = predict_logits(model, loader)
    return quality_metrics(logits, labels)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, layers: dict[str, nn.Module], ranges: dict, loader) -> list[dict]:
    base = score(model, loader)
    rows = []
    for name, module in layers.items():
        if isinstance(module, nn.Embedding):
            quantized = Int8Embedding.from_float(module)
        else:
            quantized = Int8Linear.from_float(module, "static", *ranges[name])
        set_module(model, name, quantized)
        scored = score(model, loader)
        set_module(model, name, module)
        rows.append({
            "layer": name, "accuracy": scored["accuracy"], "loss": scored["loss"],
            "accuracy_delta": (scored["accuracy"] - base["accuracy"]) * 100.0, "loss_delta": scored["loss"] - base["loss"],
        })
    return sorted(rows, key=lambda r: (r["loss_delta"]), reverse=True)


def write_sensitivity(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "sensitivity.json", rows)
    atomic_write_text(out_dir / "sensitivity.md", "# Per-layer int8 sensitivity (validation split)\n\n" + sensitivity_table(rows) + "\n")
    shown = rows[:25]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(shown) + 1.5))
    ax.barh([r["layer"] for r in shown][::-1], [r["loss_delta"] for r in shown][::-1], color="tab:orange")
    ax.set_xlabel("validation loss increase when only this layer is int8 (nats)")
    ax.set_title("lowbit: most quantization-sensitive layers")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    save_png(fig, out_dir / "sensitivity.png", dpi=110)
