"""Training order: grouping by length cuts padding and still takes every row once per epoch, seeded."""

from __future__ import annotations

import numpy as np
import pandas as pd
from transformers import AutoTokenizer

from lowbit.builtin_data import generate_reviews
from lowbit.models import resolve_model
from lowbit.task_types import causal_lm, sequence_classification
from tests.tiny_model import small_chat_tokenizer


def padded_and_real_tokens(loader) -> tuple[int, int]:
    """(tokens in the padded batches, tokens of the rows themselves) over one epoch."""
    padded = real = 0
    for batch in loader:
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return padded, real


def check_grouping(make, rows: int, lengths: list[int], batch_size: int) -> None:
    shuffled, grouped = make(group_by_length=False), make(group_by_length=True)
    shuffled_padded, shuffled_real = padded_and_real_tokens(shuffled)
    grouped_padded, grouped_real = padded_and_real_tokens(grouped)
    assert grouped_real == shuffled_real == sum(lengths)  # the same rows, whole
    assert shuffled_padded > 1.3 * shuffled_real           # lengths vary: a plain shuffle pads a lot
    assert grouped_padded - grouped_real < (shuffled_padded - shuffled_real) / 2  # grouped: less than half that
    # every row once per epoch, a new order each epoch, the same orders again for the same seed
    order = make(group_by_length=True).sampler
    first, second = list(order), list(order)
    assert sorted(first) == sorted(second) == list(range(rows)) and first != second
    again = make(group_by_length=True).sampler
    assert [list(again), list(again)] == [first, second]
    # the longest row is in the first batch: a batch that does not fit in memory fails on the first step
    assert max(lengths[i] for i in first[:batch_size]) == max(lengths)


def test_classifier_batches_texts_of_similar_length():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:minilm-l6"))
    frame = generate_reviews(400, seed=1)
    frame["label"] = frame["label"].map({"negative": 0, "neutral": 1, "positive": 2})
    lengths = sequence_classification.token_lengths(tokenizer, frame["text"].tolist(), 64, chunk=96)  # chunks join up
    assert lengths == [len(ids) for ids in tokenizer(frame["text"].tolist(), truncation=True, max_length=64)["input_ids"]]

    def make(group_by_length):
        return sequence_classification.make_loader(tokenizer, frame, 32, 64, shuffle=True, seed=0,
                                                   group_by_length=group_by_length)

    check_grouping(make, len(frame), lengths, 32)


def test_instruction_examples_are_batched_by_token_count():
    tokenizer = small_chat_tokenizer()
    words = np.random.default_rng(0).integers(1, 40, size=96)
    frame = pd.DataFrame({"prompt": [" ".join(["copy"] * n) for n in words], "target": ["done"] * len(words)})
    lengths = [len(causal_lm.encode(tokenizer, p, t)[0]) for p, t in zip(frame["prompt"], frame["target"])]

    def make(group_by_length):
        return causal_lm.make_loader(tokenizer, frame, 8, 256, shuffle=True, seed=0, group_by_length=group_by_length)

    check_grouping(make, len(frame), lengths, 8)
