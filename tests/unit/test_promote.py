"""The promotion policy and gate (pure), alias names, cron strings and the promote params."""

import time

import pytest

from flows.mlflow_store import VariantRun
from flows.promote import gate, pick_challenger
from flows.registry import check_alias, connect
from flows.retrain import check_cron
from lowbit.config import load_params, write_overrides
from lowbit.errors import LowbitError
from tests.conftest import REPO


def policy(**changes):
    return load_params(REPO / "params.yaml").promote.model_copy(update=changes)


def candidate(variant, accuracy, delta, weight_bytes, latency=5.0, throughput=100.0):
    metrics = {"accuracy": accuracy, "accuracy_delta": delta, "weight_bytes": weight_bytes, "f1_macro": accuracy,
               "latency_ms_p50": latency, "throughput_samples_s": throughput}
    return VariantRun(run_id=f"run-{variant}", variant=variant, metrics=metrics, tags={})


RUN = [
    candidate("fp32", 0.90, 0.0, 90e6, latency=8.0, throughput=140.0),
    candidate("half_bf16", 0.899, -0.1, 45e6, latency=6.0, throughput=280.0),
    candidate("ptq_int8_dynamic", 0.895, -0.5, 30e6, latency=4.0, throughput=340.0),
    candidate("ptq_nf4", 0.87, -3.0, 20e6, latency=9.0, throughput=230.0),  # smallest, but 3 points down
]


def test_the_challenger_is_the_best_eligible_variant_by_the_objective():
    best, skipped = pick_challenger(RUN, policy(objective="weight_bytes", max_accuracy_drop=1.0))
    assert best.variant == "ptq_int8_dynamic"
    assert skipped == ["ptq_nf4: 3.00 points below fp32 > promote.max_accuracy_drop 1.0"]
    assert pick_challenger(RUN, policy(objective="weight_bytes", max_accuracy_drop=5.0))[0].variant == "ptq_nf4"
    assert pick_challenger(RUN, policy(objective="throughput_samples_s"))[0].variant == "ptq_int8_dynamic"
    assert pick_challenger(RUN, policy(objective="accuracy"))[0].variant == "fp32"
    best, skipped = pick_challenger(RUN, policy(objective="accuracy", max_latency_ms_p50=7.0))
    assert best.variant == "half_bf16" and "fp32: latency_ms_p50 8.00 > promote.max_latency_ms_p50 7.0" in skipped
    best, skipped = pick_challenger(RUN, policy(max_weight_bytes=10_000_000))
    assert best is None and len(skipped) == 4


def test_a_variant_without_the_objective_is_skipped_with_the_reason():
    partial = VariantRun(run_id="r", variant="lora", metrics={"accuracy": 0.9, "accuracy_delta": 0.0}, tags={})
    best, skipped = pick_challenger([partial], policy(objective="latency_ms_p50"))
    assert best is None and skipped == ["lora: no latency_ms_p50 recorded"]


def test_the_gate_demands_the_relative_improvement_and_keeps_accuracy():
    champion = {"accuracy": 0.90, "weight_bytes": 45e6, "f1_macro": 0.9}
    rule = policy(objective="weight_bytes", min_improvement=0.05, accuracy_tolerance=0.5)
    assert gate({"accuracy": 0.899, "weight_bytes": 30e6}, champion, rule) is None
    too_little = gate({"accuracy": 0.90, "weight_bytes": 44e6}, champion, rule)  # 2.2% smaller < 5%
    assert too_little and "weight_bytes" in too_little and "relative" in too_little.lower()
    less_accurate = gate({"accuracy": 0.894, "weight_bytes": 30e6}, champion, rule)  # 0.6 points down > 0.5
    assert less_accurate and "accuracy" in less_accurate and "weight_bytes" not in less_accurate
    same = gate(dict(champion), champion, rule)  # a retrain that changed nothing
    assert same and "weight_bytes" in same


def test_the_gate_on_accuracy_itself_needs_the_relative_gain():
    champion = {"accuracy": 0.80, "weight_bytes": 45e6}
    rule = policy(objective="accuracy", min_improvement=0.01)
    assert gate({"accuracy": 0.81, "weight_bytes": 90e6}, champion, rule) is None  # +1.25% relative
    assert gate({"accuracy": 0.805, "weight_bytes": 10e6}, champion, rule)  # +0.6% relative


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v1", "V12"])
def test_aliases_mlflow_reserves_are_refused(alias):
    with pytest.raises(LowbitError, match="reserved by MLflow"):
        check_alias(alias)
    assert check_alias("champion") == "champion" and check_alias("v1-candidate") == "v1-candidate"
    with pytest.raises(LowbitError, match="letters, digits"):
        check_alias("my alias")


@pytest.mark.parametrize("cron", ["61 * * * *", "every monday", "* * *"])
def test_a_cron_that_does_not_parse_is_refused(cron):
    with pytest.raises(LowbitError, match="is not a cron expression.*minute hour"):
        check_cron(cron)
    assert check_cron("0 3 * * 1") == "0 3 * * 1"


def test_promote_params_are_validated_naming_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(LowbitError, match=r"promote\.objective.*not one of the promotion objectives.*weight_bytes"):
        write_overrides(params, ["promote.objective=bleu"])
    with pytest.raises(LowbitError, match=r"promote\.min_improvement"):
        write_overrides(params, ["promote.min_improvement=0"])
    with pytest.raises(LowbitError, match=r"promote\.champion_alias.*'latest' is reserved by MLflow"):
        write_overrides(params, ["promote.champion_alias=latest"])
    with pytest.raises(LowbitError, match=r"both 'champion'; they must differ"):
        write_overrides(params, ["promote.previous_alias=champion"])


def test_a_tracking_server_that_does_not_answer_fails_fast_and_says_what_to_set(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    started = time.perf_counter()
    with pytest.raises(LowbitError, match=r"http://127.0.0.1:9 did not answer \(.*; 2 tries of up to 2 s\).*"
                                          r"tracking\.uri in params\.yaml or MLFLOW_TRACKING_URI.*nothing was registered"):
        connect("http://127.0.0.1:9")
    assert time.perf_counter() - started < 20
