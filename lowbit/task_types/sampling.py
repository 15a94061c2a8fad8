"""The order training takes its rows in: a seeded shuffle, optionally grouped by length.

Batches are padded to their longest row, so a shuffle that mixes short and long texts pays
for padding. On the default 1,300 training rows of builtin:reviews (6 to 46 tokens, median 24)
a plain shuffle's batches of 32 hold 65% more tokens than the texts have; grouped by length they
hold 9% more, and the baseline's two epochs took 54 s instead of 69 s on 2 cores, to the same
validation accuracy (0.89 against 0.88). transformers' LengthGroupedSampler (what the HF Trainer's
`group_by_length` uses) shuffles, sorts each mega-batch (up to 50 batches, fewer for a small
split) by length and puts the longest batch first: a batch too big for memory fails the first step.
"""

from __future__ import annotations

import torch
from torch.utils.data import RandomSampler, Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler


def training_order(size: int, batch_size: int, seed: int, lengths: list[int] | None = None) -> Sampler:
    """A new seeded order every epoch; with `lengths` (tokens per row), rows of similar length share batches."""
    generator = torch.Generator().manual_seed(seed)
    if lengths is None:
        return RandomSampler(range(size), generator=generator)
    return LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
