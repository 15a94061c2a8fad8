"""lowbit: make fine-tuned transformers cheaper, measurably and reproducibly.

The library has no Prefect import; MLflow is used only in lowbit/tracking.py.
Stages live in tasks/, orchestration in flows/.
"""

__version__ = "0.1.0"
