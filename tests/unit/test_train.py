import numpy as np
import pytest
import torch

from lowbit.builtin_data import generate_reviews
from lowbit.config import ModelParams, TrainParams
from lowbit.hardware import TRAINING_MMAP_THRESHOLD, Capabilities
from lowbit.measure import weight_bytes
from lowbit.models import load_classifier, load_tokenizer
from lowbit.task_types.sequence_classification import make_loader, predict_logits
from lowbit.train import train
from tests.tiny_model import tiny_classifier_dir

MODEL = ModelParams(task="sequence_classification", name="tiny", trust_remote_code=False, max_length=32)


def frames():
    frame = generate_reviews(360, seed=1)
    frame["label"] = frame["label"].map({"negative": 0, "neutral": 1, "positive": 2})
    return frame.iloc[:300].reset_index(drop=True), frame.iloc[300:].reset_index(drop=True)


def cfg(**overrides) -> TrainParams:
    base = dict(epochs=4, learning_rate=5e-3, batch_size=16, warmup_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, group_by_length=False, seed=0)
    return TrainParams(**(base | overrides))


@pytest.fixture
def tiny(tmp_path):
    path = tiny_classifier_dir(tmp_path / "tiny")
    return load_classifier(str(path), MODEL), load_tokenizer(str(path), MODEL)


def test_training_lowers_the_loss_and_restores_the_best_validation_epoch(tiny):
    model, tokenizer = tiny
    train_frame, val_frame = frames()
    result = train(model, tokenizer, train_frame, val_frame, cfg(), max_length=32)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    best = max(result.history, key=lambda h: h["val_accuracy"])
    assert (result.best_epoch, result.best_val_accuracy) == (best["epoch"], best["val_accuracy"])
    logits, labels = predict_logits(model, make_loader(tokenizer, val_frame, 64, 32))
    assert float((logits.argmax(-1) == labels).mean()) == pytest.approx(result.best_val_accuracy)
    assert result.train_samples_s > 0
    # memory: the RSS growth while training covers at least the gradients and AdamW's two
    # moments (counted tensor by tensor in train_state_bytes), and the peak covers the growth
    held_beyond_weights = result.train_state_bytes - weight_bytes(model)
    assert held_beyond_weights >= 3 * weight_bytes(model) * 0.99  # grads + 2 moments, every weight trainable
    assert held_beyond_weights <= result.peak_rss_growth_bytes < result.peak_rss_bytes


@pytest.mark.parametrize("group_by_length", [False, True])
def test_training_is_reproducible_for_a_seed(tmp_path, group_by_length):
    outs = []
    for run in range(2):
        path = tiny_classifier_dir(tmp_path / f"tiny{run}")
        model, tokenizer = load_classifier(str(path), MODEL), load_tokenizer(str(path), MODEL)
        train_frame, val_frame = frames()
        train(model, tokenizer, train_frame, val_frame, cfg(epochs=1, group_by_length=group_by_length), max_length=32)
        outs.append(predict_logits(model, make_loader(tokenizer, val_frame, 64, 32))[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_the_last_epoch_is_not_copied_and_an_earlier_best_is_restored(tiny, monkeypatch):
    """A copy of the weights is taken only for a best epoch that later epochs could spoil: the last
    epoch, best or not, is never copied (that copy could never be restored)."""
    import lowbit.task_types.sequence_classification as classification
    import lowbit.train as training

    model, tokenizer = tiny
    train_frame, val_frame = frames()
    copies, take_copy = [], training.snapshot
    monkeypatch.setattr(training, "snapshot", lambda m: copies.append(take_copy(m)) or copies[-1])
    for scores, best_epoch, copied in (([0.2, 0.3, 0.4], 3, 2), ([0.5, 0.3, 0.4], 1, 1)):
        copies.clear()
        monkeypatch.setattr(classification, "validation_score", lambda *_, s=iter(scores): next(s))
        assert train(model, tokenizer, train_frame, val_frame, cfg(epochs=3), max_length=32).best_epoch == best_epoch
        assert len(copies) == copied
    for name, tensor in training.trained_tensors(model).items():  # the first epoch's weights, restored
        assert torch.equal(tensor, copies[0][name]), name


def test_training_sets_the_mmap_threshold_of_its_machine_and_records_it(tiny, monkeypatch):
    model, tokenizer = tiny
    train_frame, val_frame = frames()
    applied = []
    monkeypatch.setattr("lowbit.train.set_mmap_threshold", lambda size: applied.append(size) or True)
    monkeypatch.setattr("lowbit.train.detect", lambda: Capabilities(libc="glibc"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    result = train(model, tokenizer, train_frame, val_frame, cfg(epochs=1), max_length=32)
    assert applied == [TRAINING_MMAP_THRESHOLD]
    assert result.figures()["malloc_mmap_threshold_bytes"] == TRAINING_MMAP_THRESHOLD
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")  # the user's own: left alone
    result = train(model, tokenizer, train_frame, val_frame, cfg(epochs=1), max_length=32)
    assert applied == [TRAINING_MMAP_THRESHOLD] and result.malloc_mmap_threshold_bytes is None


@pytest.mark.parametrize("libc, trims", [("glibc", True), ("musl", False)])
def test_training_returns_free_heap_pages_after_every_step_where_its_machine_can(tiny, monkeypatch, libc, trims):
    model, tokenizer = tiny
    train_frame, val_frame = frames()
    trimmed, steps = [], []
    monkeypatch.setattr("lowbit.train.return_free_pages", lambda: trimmed.append(len(steps)) or True)
    monkeypatch.setattr("lowbit.train.detect", lambda: Capabilities(libc=libc))
    result = train(model, tokenizer, train_frame, val_frame, cfg(epochs=2), max_length=32, on_step=steps.append)
    assert len(steps) == 2 * 19  # 300 rows in batches of 16
    assert trimmed == (list(range(len(steps))) if trims else [])  # after each step, before its hook
    assert result.figures()["malloc_trim_each_step"] is trims
