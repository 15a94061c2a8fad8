"""A tiny BERT classifier (random weights, MiniLM's tokenizer) for fast unit tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from lowbit.models import resolve_model


def tiny_classifier_dir(
    root: Path, num_labels: int = 3, seed: int = 0, init_std: float = 0.02, hidden_size: int = 32
) -> Path:
    """init_std > 0.02 makes frozen random features depend on the input (adapter tests need that).
    hidden_size 64 or more gives layers that bitsandbytes' AVX512-BF16 layout can hold (32 cannot)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128, num_labels=num_labels, initializer_range=init_std,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(root, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_model("embedded:minilm-l6")).save_pretrained(root)
    return root
