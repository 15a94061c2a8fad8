"""Builtin datasets: labelled text corpora generated deterministically from a seed.

`builtin:reviews` — product reviews labelled negative / neutral / positive.

How a review is made (so that the task is learnable but not trivial, and an FP32
MiniLM fine-tune lands between 80% and 97% accuracy, leaving room for quantization
to show its cost):
1. The label is drawn uniformly; a product and 1–3 product aspects are drawn.
2. Each aspect gets a clause whose polarity follows the label, with deliberate
   hard cases: positive and negative reviews carry one opposite-polarity clause
   ("... but the delivery was awful") in 35% of cases, polarity is often said by
   negating the opposite ("not bad at all", "isn't great"), and neutral reviews
   balance a mild praise against a mild complaint.
3. A verdict sentence ("Would buy again.") is added in 55% of reviews only, so
   the label must usually be read from the clauses.
4. Annotator noise: 6% of labels are replaced by another label at random. This
   caps reachable test accuracy near 94–96% as on real crowd-labelled data.
The same (name, rows, seed) always gives the same rows, in the same order.
"""

from __future__ import annotations

import random

import pandas as pd

LABELS = ("negative", "neutral", "positive")
LABEL_NOISE = 0.06
CONTRAST_RATE = 0.35
VERDICT_RATE = 0.55

PRODUCTS = [
    "phone", "laptop", "blender", "pair of headphones", "coffee maker", "vacuum", "backpack",
    "monitor", "kettle", "keyboard", "camera", "desk lamp", "air fryer", "smartwatch",
    "router", "printer", "office chair", "electric toothbrush", "speaker", "tablet",
]
ASPECTS = [
    "battery life", "sound", "screen", "build quality", "price", "delivery", "customer service",
    "setup", "design", "performance", "noise level", "manual", "packaging", "warranty support",
    "charging speed", "materials", "app", "size", "weight", "cleaning",
]
WORDS = {
    (1, 2): ["fantastic", "excellent", "superb", "outstanding", "brilliant", "flawless", "amazing", "wonderful"],
    (1, 1): ["good", "solid", "nice", "pleasant", "reliable", "sturdy", "quick", "handy"],
    (0, 0): ["okay", "average", "acceptable", "fine", "ordinary", "standard", "so-so", "unremarkable"],
    (-1, 1): ["disappointing", "mediocre", "flimsy", "sluggish", "underwhelming", "clunky", "fiddly"],
    (-1, 2): ["terrible", "awful", "dreadful", "useless", "horrible", "abysmal", "infuriating"],
}
PLAIN_TEMPLATES = ["the {a} is {w}", "I found the {a} {w}", "{a}: {w}", "the {a} turned out {w}", "honestly the {a} is {w}"]
NEGATED = {  # polarity said by negating its opposite
    1: ["the {a} is not bad at all", "I can't complain about the {a}", "no issues with the {a}"],
    -1: ["the {a} isn't great", "the {a} is not what I hoped for", "I can't say the {a} impressed me"],
}
VERDICTS = {
    1: ["Would buy again.", "Highly recommend.", "Five stars from me.", "Really happy with it."],
    0: ["It does the job.", "Nothing special either way.", "Hard to say if it's worth it.", "Three stars."],
    -1: ["Returning it.", "Save your money.", "Would not recommend.", "One star."],
}
OPENERS = ["Bought this {p} last month.", "My new {p} arrived.", "Using the {p} daily now.", "Got the {p} as a gift.", ""]


def clause(rng: random.Random, aspect: str, polarity: int, strength: int) -> str:
    if polarity != 0 and strength == 1 and rng.random() < 0.4:
        return rng.choice(NEGATED[polarity]).format(a=aspect)
    word = rng.choice(WORDS[(polarity, strength if polarity else 0)])
    return rng.choice(PLAIN_TEMPLATES).format(a=aspect, w=word)


def review(rng: random.Random, label: str) -> str:
    polarity = LABELS.index(label) - 1
    aspects = rng.sample(ASPECTS, rng.randint(1, 3))
    if polarity == 0:
        if len(aspects) >= 2 and rng.random() < 0.5:
            parts = [clause(rng, aspects[0], 1, 1), clause(rng, aspects[1], -1, 1)]
        else:
            parts = [clause(rng, a, 0, 0) for a in aspects]
    else:
        parts = [clause(rng, a, polarity, rng.choice((1, 2))) for a in aspects]
        if rng.random() < CONTRAST_RATE:
            extra = rng.choice([a for a in ASPECTS if a not in aspects])
            parts.insert(rng.randrange(1, len(parts) + 1), "but " + clause(rng, extra, -polarity, 1))
    body = ", ".join(parts)
    opener = rng.choice(OPENERS).format(p=rng.choice(PRODUCTS))
    text = f"{opener} {body[0].upper()}{body[1:]}.".strip()
    if rng.random() < VERDICT_RATE:
        text += " " + rng.choice(VERDICTS[polarity])
    return text.replace(", but", " but")


def generate_reviews(rows: int, seed: int) -> pd.DataFrame:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(rows):
        label = rng.choice(LABELS)
        texts.append(review(rng, label))
        if rng.random() < LABEL_NOISE:
            label = rng.choice([other for other in LABELS if other != label])
        labels.append(label)
    return pd.DataFrame({"text": texts, "label": labels})


BUILTIN_DATASETS = {"reviews": generate_reviews}
