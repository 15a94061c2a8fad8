import pytest

from lowbit.metrics import load_metric
from lowbit.metrics.chrf import chrf_statistics, corpus_chrf, sentence_chrf
from lowbit.metrics.generation import chrf_interval, generation_metrics
from lowbit.metrics.rouge_l import rouge_l_f, tokenize

# Reference values computed with the real libraries in a throwaway venv (not project dependencies):
#   rouge_score 0.1.2: rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(ref, pred)["rougeL"].fmeasure
#   sacrebleu 2.6.0:   sacrebleu.sentence_chrf(pred, [ref]).score and sacrebleu.corpus_chrf(preds, [refs]).score
# (pred, ref, ROUGE-L F, sentence chrF)
REFERENCE_PAIRS = [
    ("The capital of France is Paris.", "The capital of France is Paris.", 1.0, 100.0),  # identical
    ("blue green", "seven eight", 0.0, 10.397376543209877),  # disjoint words (share letters e, n)
    ("The opposite of hot is cold.", "The opposite of 'hot' is 'warm'.", 0.8333333333333334, 50.50293473768291),
    ("HELLO, World!", "hello world", 1.0, 17.95162452580031),  # punctuation / case: ROUGE ignores, chrF does not
    ("", "Paris", 0.0, 0.0),  # empty prediction
    ("The cat sat on the mat. It was happy.", "A cat sat on a mat. The cat was happy.", 0.631578947368421, 63.697859505330754),
    ("cats", "cat", 0.0, 89.84375),  # reference shorter than char order 6
    ("Le café est chaud.", "Le cafe est chaud", 0.75, 65.46493657106939),  # rouge_score drops non-ASCII letters
]
CORPUS_CHRF_ALL = 60.977652519646355  # sacrebleu 2.6.0 corpus_chrf over all REFERENCE_PAIRS
CORPUS_CHRF_FIRST3 = 66.73234108649048  # ... over the first three
TOL = 1e-6


@pytest.mark.parametrize("pred, ref, rouge, chrf", REFERENCE_PAIRS)
def test_sentence_scores_match_rouge_score_and_sacrebleu(pred, ref, rouge, chrf):
    assert rouge_l_f(pred, ref) == pytest.approx(rouge, abs=TOL)
    assert sentence_chrf(pred, ref) == pytest.approx(chrf, abs=TOL)


def test_corpus_metrics_match_the_libraries():
    preds, refs = [p for p, *_ in REFERENCE_PAIRS], [r for _, r, *_ in REFERENCE_PAIRS]
    out = generation_metrics(preds, refs)
    assert set(out) == {"exact_match", "rouge_l", "chrf"}
    assert out["chrf"] == pytest.approx(CORPUS_CHRF_ALL, abs=TOL)
    assert out["rouge_l"] == pytest.approx(sum(r for *_, r, _ in REFERENCE_PAIRS) / len(REFERENCE_PAIRS), abs=TOL)
    assert out["exact_match"] == pytest.approx(1 / 8)
    assert load_metric("chrf").compute(predictions=preds[:3], references=refs[:3])["chrf"] == pytest.approx(
        CORPUS_CHRF_FIRST3, abs=TOL)


def test_rouge_l_hand_worked():
    # tokens: "the opposite of hot is cold" vs "the opposite of hot is warm": 6 each, LCS 5
    # P = R = 5/6 -> F = 5/6
    assert rouge_l_f("The opposite of hot is cold.", "The opposite of 'hot' is 'warm'.") == pytest.approx(5 / 6)
    # pred "the cat sat on the mat it was happy" (9), ref "a cat sat on a mat the cat was happy" (10)
    # LCS "cat sat on mat was happy" = 6: P = 6/9, R = 6/10, F = 2PR/(P+R) = (72/90)/(114/90) = 12/19
    assert rouge_l_f("The cat sat on the mat. It was happy.", "A cat sat on a mat. The cat was happy.") == pytest.approx(12 / 19)
    assert tokenize("HELLO, World! x-2") == ["hello", "world", "x", "2"]
    assert load_metric("rouge_l").compute(predictions=["a b", "c"], references=["a b", "d"]) == {"rouge_l": 0.5}


def test_chrf_hand_worked_and_corpus_sums_statistics():
    # "cats" vs "cat": order 1: hyp 4, ref 3, match 3; order 2: 3, 2, 2; order 3: 2, 1, 1;
    # order 4: the reference has no 4-grams, so the hypothesis's 4-gram counts 0 too (sacrebleu rule).
    # Effective orders 1..3: P = (3/4 + 2/3 + 1/2)/3 = 23/36, R = 1; chrF2 = 100 * 5PR/(4P+R) = 100 * 115/128
    assert chrf_statistics("cats", "cat")[:12] == [4, 3, 3, 3, 2, 2, 2, 1, 1, 0, 0, 0]
    assert sentence_chrf("cats", "cat") == pytest.approx(100 * 115 / 128)
    # Corpus: statistics are summed before F, not sentence scores averaged.
    # + ("ab", "ab"): order 1: 6, 5, 5; order 2: 4, 3, 3; order 3: 2, 1, 1 (the "ab" pair has no 3-grams)
    # P = (5/6 + 3/4 + 1/2)/3 = 25/36, R = 1 -> 100 * 125/136 = 91.9118 (sacrebleu 2.6.0: 91.91176470588236),
    # while the mean of sentence scores would be (89.84375 + 100)/2 = 94.92
    assert corpus_chrf(["cats", "ab"], ["cat", "ab"]) == pytest.approx(100 * 125 / 136)
    assert load_metric("chrf").compute(predictions=["cats", "ab"], references=["cat", "ab"])["chrf"] == pytest.approx(
        91.91176470588236, abs=TOL)
    # whitespace is removed before n-grams, case is kept
    assert sentence_chrf("a b c", "abc") == pytest.approx(100.0)
    assert sentence_chrf("ABC", "abc") == 0.0


def test_exact_match_strips_surrounding_whitespace_only():
    out = load_metric("exact_match").compute(predictions=[" Paris \n", "paris", "Par is", ""], references=["Paris", "Paris", "Paris", ""])
    assert out == {"exact_match": 0.5}


def test_chrf_interval_is_a_bootstrap_of_the_corpus_score():
    preds, refs = [p for p, *_ in REFERENCE_PAIRS], [r for _, r, *_ in REFERENCE_PAIRS]
    corpus = generation_metrics(preds, refs)["chrf"]
    low, high = chrf_interval(preds, refs, resamples=2000, seed=0)
    assert low < corpus < high and high - low > 5.0  # eight varied pairs: a wide interval around the corpus value
    assert chrf_interval(preds, refs, resamples=2000, seed=0) == (low, high)  # seeded
    assert chrf_interval(preds[:1] * 4, refs[:1] * 4, resamples=200, seed=0) == (100.0, 100.0)  # identical pairs


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        chrf_interval([], [], resamples=10, seed=0)
