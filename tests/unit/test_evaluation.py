"""The evaluation harness times models, not compilers: every shape class is compiled before the timing."""

from __future__ import annotations

import time
import weakref
from types import SimpleNamespace

import pandas as pd
import torch

from lowbit.config import load_params
from lowbit.evaluation import evaluate_model
from lowbit.models import load_tokenizer, resolve_model
from tests.conftest import REPO

COMPILE_S = 0.5


class CompilesPerShapeClass(torch.nn.Module):
    """Stands in for a compiled program: the first call with a new shape class (batch 1 or more, as
    Dynamo specializes size 1) takes COMPILE_S and adds it to compile_seconds; later calls are fast."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, 2)
        self.compile_seconds = 0.0
        self.compiled: set[bool] = set()

    def forward(self, input_ids, **_):
        shape_class = input_ids.shape[0] == 1
        if shape_class not in self.compiled:
            self.compiled.add(shape_class)
            time.sleep(COMPILE_S)
            self.compile_seconds += COMPILE_S
        return SimpleNamespace(logits=self.head(input_ids[:, :1].float()))


def test_a_ragged_last_batch_compiles_in_the_warm_up_not_in_the_timed_pass():
    params = load_params(REPO / "params.yaml", ["evaluate.batch_size=16", "evaluate.warmup_batches=1",
                                                "evaluate.latency_samples=5"]).evaluate
    model_params = load_params(REPO / "params.yaml").model
    tokenizer = load_tokenizer(resolve_model("embedded:minilm-l6"), model_params)
    frame = pd.DataFrame({"text": ["a fine phone", "a poor kettle"] * 16 + ["one more"], "label": [1, 0] * 16 + [1]})
    model = CompilesPerShapeClass()  # 33 rows at batch 16: the last batch holds 1 row, a shape class of its own
    metrics, logits, _ = evaluate_model(model, tokenizer, frame, params, max_length=32)
    assert model.compile_seconds == 2 * COMPILE_S  # both classes compiled, each once
    assert logits.shape == (33, 2)
    # Timing a pass that compiles would give at most 33 / 0.5 = 66 samples/s; three tiny forward passes take ~ms.
    assert metrics["throughput_samples_s"] > 33 / (COMPILE_S / 5)
    assert metrics["latency_ms_p50"] < COMPILE_S * 1000 / 5


# Ten texts of different lengths: sorting them by length reorders every batch of 4.
WORD_COUNTS = (9, 2, 14, 1, 6, 6, 11, 3, 20, 5)


def tiny_classifier(tmp_path):
    """(model, tokenizer) of a tiny random BERT classifier with max_length 32."""
    from lowbit.config import ModelParams
    from lowbit.models import load_classifier
    from tests.tiny_model import tiny_classifier_dir

    model_params = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)
    tiny = tiny_classifier_dir(tmp_path / "model", init_std=0.2)
    return load_classifier(str(tiny), model_params), load_tokenizer(str(tiny), model_params)


def test_length_ordered_batches_give_every_row_its_own_logits(tmp_path):
    """Rows are batched by length (less padding), longest first for predictions (memory), and every output
    comes back in row order."""
    from lowbit.evaluation import in_length_order, predict_in_length_order
    from lowbit.task_types.sequence_classification import make_loader, predict_logits

    model, tokenizer = tiny_classifier(tmp_path)
    texts = [" ".join(["word"] * n) for n in WORD_COUNTS]
    frame = pd.DataFrame({"text": texts, "label": list(range(10))})
    ordered, back = in_length_order(tokenizer, frame, 32)
    assert [len(t.split()) for t in ordered["text"]] == sorted(len(t.split()) for t in texts)
    assert ordered["label"].to_numpy()[back].tolist() == list(range(10))
    longest_first, back = in_length_order(tokenizer, frame, 32, longest_first=True)
    assert longest_first["label"].tolist() == [8, 2, 6, 0, 4, 5, 9, 7, 1, 3]  # 20, 14, 11, 9, 6, 6 (row order), 5, ...
    assert longest_first["label"].to_numpy()[back].tolist() == list(range(10))
    logits, labels = predict_in_length_order(model, tokenizer, frame, 4, 32)
    reference, _ = predict_logits(model, make_loader(tokenizer, frame, 4, 32))  # split order, padded more
    assert labels.tolist() == list(range(10))
    torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(reference), atol=1e-5, rtol=1e-5)


def test_the_timed_pass_tokenizes_batch_by_batch_and_returns_every_row_in_row_order(tmp_path, monkeypatch):
    """evaluate_model streams the test split (one encoded batch at a time) and still gives each row its logits."""
    from lowbit import evaluation
    from lowbit.task_types.sequence_classification import make_loader, predict_logits

    model, tokenizer = tiny_classifier(tmp_path)
    frame = pd.DataFrame({"text": [" ".join(["word"] * n) for n in WORD_COUNTS],
                          "label": [0, 1, 2] * 3 + [0]})
    params = load_params(REPO / "params.yaml", ["evaluate.batch_size=4", "evaluate.warmup_batches=1",
                                                "evaluate.latency_samples=5"]).evaluate
    live, most_live = [], [0]

    def tracked_loader(*args, **kwargs):  # counts encoded batches alive at once, by their input_ids
        for batch in make_loader(*args, **kwargs):
            live.append(weakref.ref(batch["input_ids"]))
            most_live[0] = max(most_live[0], sum(ref() is not None for ref in live))
            yield batch

    monkeypatch.setattr(evaluation, "make_loader", tracked_loader)
    metrics, logits, labels = evaluation.evaluate_model(model, tokenizer, frame, params, max_length=32)
    reference, _ = predict_logits(model, make_loader(tokenizer, frame, 4, 32))  # split order, no length sort
    assert labels.tolist() == frame["label"].tolist() and metrics["n_test"] == 10
    torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(reference), atol=1e-5, rtol=1e-5)
    assert most_live[0] <= 2  # the batch in hand and at most the one before it: never the 3 batches of the split
