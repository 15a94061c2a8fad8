"""The one writer of report tables and figures: Markdown tables, and PNGs saved atomically.

    text = markdown_table(["layer", "Δacc pts"], [["query", "+0.10"]])
    fig, ax = plt.subplots(); ...; save_png(fig, Path("reports/pareto.png"))
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def sensitivity_table(rows: list[dict]) -> str:
    """Per-layer quantization damage (lowbit.quant.sensitivity rows): the ptq stage and the report print it."""
    return markdown_table(["layer", "Δacc pts", "Δloss"],
                          [[r["layer"], f"{r['accuracy_delta']:+.2f}", f"{r['loss_delta']:+.4f}"] for r in rows])


def save_png(fig, path: Path, dpi: int = 120) -> None:
    """Write the figure next to `path` and rename it into place, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
