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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowbit.metrics import quality_metrics  # noqa: E402
from lowbit.io import atomic_write_text, write_json  # noqa: E402
from lowbit.quant.modules import Int8Embedding, Int8Linear  # noqa: E402
from lowbit.quant.ptq import set_module  # noqa: E402
from lowbit.train import predict_logits  # noqa: E402


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
    lines = ["| layer | Δacc pts | Δloss |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['accuracy_delta']:+.2f} | {r['loss_delta']:+.4f} |" for r in rows]
    atomic_write_text(out_dir / "sensitivity.md", "# Per-layer int8 sensitivity (validation split)\n\n" + "\n".join(lines) + "\n")
    shown = rows[:25]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(shown) + 1.5))
    ax.barh([r["layer"] for r in shown][::-1], [r["loss_delta"] for r in shown][::-1], color="tab:orange")
    ax.set_xlabel("validation loss increase when only this layer is int8 (nats)")
    ax.set_title("lowbit: most quantization-sensitive layers")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    tmp = out_dir / ".sensitivity.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_dir / "sensitivity.png")
