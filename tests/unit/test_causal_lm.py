"""The causal_lm task type: the label mask, the chat template, records and their errors, the metrics,
and a tiny random Llama through every stage (prepare, baseline, ptq, qat, lora, qlora, evaluate, report)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM

from lowbit.config import ModelParams
from lowbit.errors import LowbitError
from lowbit.report import build_summary, markdown_report
from lowbit.statistics import ratio_intervals
from lowbit.task_types import TASK_TYPES, causal_lm, load_saved
from lowbit.task_types.causal_lm import (
    IGNORE, PLAIN_TEMPLATE, collate, encode, instruction_records, prompt_and_target, prompt_ids, token_statistics,
)
from tests.conftest import REPO
from tests.tiny_model import small_chat_tokenizer, tiny_llama_dir

PROMPT, TARGET = "Give the opposite of 'hot'.", "The opposite of 'hot' is 'cold'."


@pytest.fixture(scope="module")
def tokenizer():
    return small_chat_tokenizer()


def test_task_types_registered_match_the_params_schema():
    assert set(ModelParams.model_fields["task"].annotation.__args__) == set(TASK_TYPES)


def test_the_unmasked_labels_are_exactly_the_target_and_the_end_of_turn(tokenizer):
    ids, labels = encode(tokenizer, PROMPT, TARGET)
    assert len(ids) == len(labels)
    kept = [token for token in labels if token != IGNORE]
    assert tokenizer.decode(kept) == TARGET + "<|im_end|>"
    assert ids[len(ids) - len(kept):] == kept  # the target comes last, after the prompt


def test_the_prompt_is_the_chat_templates_user_turn_with_the_generation_prompt(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, PROMPT))
    assert text == tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                 tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith(f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_without_a_chat_template_the_plain_template_is_used(tokenizer):
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    assert tokenizer.decode(prompt_ids(bare, PROMPT)) == PLAIN_TEMPLATE.format(prompt=PROMPT)


def test_padding_is_masked_by_position_so_the_end_of_turn_token_is_still_learnt(tokenizer):
    # SmolLM2's pad token is its end-of-turn token: masking by id would drop every eot label
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short, long = encode(tokenizer, "Hi.", "Hello."), encode(tokenizer, PROMPT, TARGET)
    batch = collate([short, long], tokenizer.pad_token_id)
    n = len(short[0])
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id  # the eot label is kept
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()


def test_reverse_swaps_the_roles():
    assert prompt_and_target("Uppercase this.", "dog", "DOG", reverse=False) == ("Uppercase this.\n\ndog", "DOG")
    prompt, target = prompt_and_target("Uppercase this.", "dog", "DOG", reverse=True)
    assert target == "Uppercase this." and "DOG" in prompt and prompt.endswith("Input:\ndog")


def test_records_missing_a_column_or_carrying_labels_are_refused():
    with pytest.raises(LowbitError, match="no `output` column"):
        instruction_records(pd.DataFrame({"instruction": ["a"]}), "data.jsonl")
    with pytest.raises(LowbitError, match="labelled rows .* model.task is causal_lm"):
        instruction_records(pd.DataFrame({"text": ["a"], "label": [1]}), "reviews.csv")
    frame = instruction_records(pd.DataFrame({"instruction": ["a "], "output": [" b"]}), "x.json")
    assert frame.to_dict("records") == [{"instruction": "a", "input": "", "output": "b"}]


def causal_params(tmp_path: Path, model_dir: Path, **extra):
    from lowbit.config import load_params

    overrides = [
        "model.task=causal_lm", f"model.name={model_dir}", "model.max_length=160", "data.source=builtin:instructions",
        "data.builtin_rows=64", "data.reverse=true", "prepare.calib_size=8", "baseline.epochs=1", "baseline.batch_size=16",
        "baseline.learning_rate=1e-3", "ptq.schemes=[int8_weight_only, int8_dynamic, nf4]", "ptq.observers=[minmax]",
        "ptq.skip_modules=[lm_head]", "ptq.quantize_embeddings=false", "ptq.calib_rows=8", "ptq.calib_batch_size=8",
        "qat.batch_size=16", "lora.epochs=1", "lora.batch_size=16", "qlora.epochs=1", "qlora.batch_size=16",
        "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]", "qlora.target_modules=[q_proj, k_proj, v_proj, o_proj]",
        "export.max_merge_drop=100", "evaluate.batch_size=16", "evaluate.generation_samples=6", "evaluate.max_new_tokens=6",
        "evaluate.bootstrap_resamples=200", "evaluate.calibration=none", *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_params(REPO / "params.yaml", overrides)


def test_every_example_too_long_is_an_error_naming_the_key_and_the_longest(tmp_path):
    from tasks.plumbing import Paths
    from tasks import prepare

    params = causal_params(tmp_path, tiny_llama_dir(tmp_path / "tiny"), **{"model.max_length": 16})
    with pytest.raises(LowbitError, match=r"every example is longer than model.max_length=16 tokens \(the longest: \d+"):
        prepare.run(params, Paths(tmp_path))
    assert not (tmp_path / "data" / "prepared").exists()


def test_token_statistics_against_hand_computed_values():
    # one example, vocabulary 3: positions 0..2; labels mask position 0 (prompt), targets at 1 and 2
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]]))
    labels = torch.tensor([[IGNORE, 1, 0]])
    stats = token_statistics(logits, labels)
    # position 0 predicts label 1 (p=0.2, top is 0: wrong); position 1 predicts label 0 (p=0.1, top is 1: wrong)
    assert stats["nll"][0] == pytest.approx(-math.log(0.2) - math.log(0.1), rel=1e-6)
    assert stats["tokens"][0] == 2 and stats["correct"][0] == 0
    assert stats["token_confidence"].tolist() == pytest.approx([0.7, 0.6], rel=1e-6)


def test_ratio_intervals_bracket_the_ratio_of_sums():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 20, size=200)
    correct = rng.binomial(tokens, 0.7)
    out = ratio_intervals({"token_accuracy": (correct, tokens)}, resamples=500, seed=0)
    point = correct.sum() / tokens.sum()
    assert out["token_accuracy_ci_low"] < point < out["token_accuracy_ci_high"]
    assert out["token_accuracy_ci_high"] - out["token_accuracy_ci_low"] < 0.1
    assert ratio_intervals({"x": (correct, tokens)}, 500, 0) == ratio_intervals({"x": (correct, tokens)}, 500, 0)


def test_int8_storage_keeps_tied_embeddings_tied_and_the_logits(tmp_path, tokenizer):
    from lowbit.quant.ptq import quantizable_layers, quantize_int8
    from lowbit.quant.storage import load_int8, save_int8
    from lowbit.io import read_json

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir(tmp_path / "tiny"))
    layout = quantize_int8(model, "weight_only", quantizable_layers(model, ["lm_head"]))
    ids = torch.tensor([encode(tokenizer, PROMPT, TARGET)[0]])
    with torch.no_grad():
        before = model(ids).logits
    save_int8(model, tokenizer, tmp_path / "int8", "ptq_int8_weight_only", layout, [])
    card = read_json(tmp_path / "int8" / "lowbit_variant.json")
    assert card["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = load_int8(tmp_path / "int8", card, ModelParams(task="causal_lm", name="x", trust_remote_code=False,
                                                                 max_length=64))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_a_tiny_llama_through_every_stage(tmp_path, monkeypatch):
    """prepare -> baseline -> ptq -> qat -> lora -> qlora -> evaluate -> report, in process, on a random
    2-layer Llama: every variant is evaluated with the causal LM figures, merged adapters match their
    adapter model, and the report shows the zero-shot row and generations side by side."""
    from flows.gguf_export import export_variant
    from lowbit.io import read_json
    from tasks import baseline, evaluate, lora, prepare, ptq, qat, qlora, report
    from tasks.plumbing import Paths

    paths = Paths(tmp_path)
    params = causal_params(tmp_path, tiny_llama_dir(tmp_path / "tiny", init_std=0.2), **{"qlora.compute_dtype": "float32"})
    for stage in (prepare, baseline, ptq, qat, lora, qlora):
        stage.run(params, paths)
    meta = read_json(paths.prepared / "meta.json")
    assert meta["task"] == "causal_lm" and meta["labels"] == [] and meta["rows"]["test"] == 16
    for section in ("lora", "qlora"):
        result = read_json(paths.models / section / "lowbit_stage.json")
        assert result["merge_val_accuracy_merged"] == pytest.approx(result["merge_val_accuracy_adapter"], abs=0.02)
        assert 0.0 < result["base_val_perplexity"] and "base_val_token_accuracy" in result
    assert_merged_logits_match(params, paths, monkeypatch)
    evaluate.run(params, paths)
    records = {p.stem: read_json(p) for p in paths.metrics.glob("*.json") if p.stem != "lowbit_stage"}
    assert set(records) == {"fp32", "zero_shot", "ptq_int8_weight_only", "ptq_int8_dynamic", "ptq_nf4", "qat_int8",
                            "lora", "lora_merged", "qlora", "qlora_merged"}
    for name, record in records.items():
        m = record["metrics"]
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9), name
        assert 0.0 <= m["token_accuracy"] <= 1.0 and m["token_accuracy_ci_low"] <= m["token_accuracy"] <= m["token_accuracy_ci_high"]
        assert m["n_generated"] == 6 and len(record["samples"]) == 5 and m["tokens_s"] > 0
        assert m["serving_memory_bytes"] == m["peak_rss_bytes"] - m["import_floor_bytes"]
    assert records["zero_shot"]["metrics"]["weight_bytes"] == records["fp32"]["metrics"]["weight_bytes"]
    # the merged model is the adapter model's weights in one matrix: same teacher-forced figures
    for section in ("lora", "qlora"):
        assert records[f"{section}_merged"]["metrics"]["loss"] == pytest.approx(records[section]["metrics"]["loss"],
                                                                                rel=1e-3)
    exported = export_variant(params, paths, "lora", ["Q8_0"])[0]  # an adapter variant exports its merged copy
    assert exported["file"] == "exports/lora_merged-Q8_0.gguf" and (tmp_path / exported["file"]).stat().st_size > 0
    assert abs(exported["loss_gap"]) < 0.05 * exported["test_loss_in_memory"]
    report.run(params, paths)
    text = (paths.reports / "summary.md").read_text()
    assert "| variant | token acc [95% CI] | Δtok-acc pts | perplexity |" in text
    assert "**Prompt 1**" in text and "| reference |" in text and "| zero_shot |" in text
    assert (paths.reports / "confusion.png").stat().st_size > 5_000


# LoRA: W0 + (alpha/r)·B·A in one fp32 matrix, the same sums in another order. QLoRA (compute dtype
# float32 here): the merged copy adds the adapters to the very NF4 weights, dequantized, that the adapter
# model computes with: measured 2e-5. The adapter model is loaded without bitsandbytes' AVX512-BF16
# repacked inference kernel, which computes in bf16 whatever the compute dtype (0.34 on logits up to 7
# here, on a CPU that has it): that is the kernel's rounding, not the merge's.
MERGE_LOGIT_TOLERANCE = {"lora": 1e-4, "qlora": 1e-3}


def assert_merged_logits_match(params, paths, monkeypatch):
    import lowbit.adapters
    from lowbit.formats import load_variant
    from lowbit.quant.bnb import set_4bit_layouts

    monkeypatch.setattr(lowbit.adapters, "set_4bit_layouts", lambda model, training: set_4bit_layouts(model, training=True))

    batch = next(iter(causal_lm.make_loader(small_chat_tokenizer(), pd.read_parquet(paths.prepared / "val.parquet"), 4,
                                            params.model.max_length)))
    batch.pop("labels")
    for section, tolerance in MERGE_LOGIT_TOLERANCE.items():
        with torch.no_grad():
            adapter = load_variant(paths.models / section / "adapter", params.model)[0](**batch).logits.float()
            merged = load_variant(paths.models / section / "merged", params.model)[0](**batch).logits.float()
        mask = batch["attention_mask"].bool()
        assert (adapter[mask] - merged[mask]).abs().max().item() < tolerance, section
    monkeypatch.undo()


def test_load_saved_gives_a_causal_lm_for_a_causal_task(tmp_path):
    model_dir = tiny_llama_dir(tmp_path / "tiny")
    model, tokenizer = load_saved(model_dir, ModelParams(task="causal_lm", name=str(model_dir), trust_remote_code=False,
                                                         max_length=64))
    assert isinstance(model, causal_lm.AUTO_MODEL._model_mapping[type(model.config)]) and tokenizer.chat_template


def test_the_report_for_causal_records_escapes_table_cells():
    metrics = {"token_accuracy": 0.5, "perplexity": 3.0, "chrf": 40.0, "rouge_l": 0.3, "exact_match": 0.1, "eot_share": 1.0,
               "weight_bytes": 100, "disk_bytes": 100, "serving_memory_bytes": 10, "bits_per_param": 32.0,
               "latency_ms_p50": 5.0, "tokens_s": 100.0}
    sample = {"prompt": "a | b", "reference": "ref", "generation": "gen", "ended": False}
    records = {v: {"task": "causal_lm", "quality_metric": "token_accuracy", "metrics": dict(metrics), "samples": [sample],
                   "report_order": i} for i, v in enumerate(["fp32", "zero_shot"])}
    records["zero_shot"]["metrics"]["token_accuracy"] = 0.2
    text = markdown_report(build_summary(records, max_accuracy_drop=1.0))
    assert "a \\| b" in text and "| fp32 | gen … |" in text
    assert "| zero_shot | 0.2000 | -30.00 |" in text


def test_a_gguf_path_that_does_not_exist_is_named(tmp_path):
    from lowbit.models import resolve_model

    with pytest.raises(LowbitError, match=r"model.name: GGUF file not found: .*missing\.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_instruction_data_for_a_classifier_says_which_task_it_needs(tmp_path):
    from lowbit.data import load_source
    from lowbit.config import load_params

    data = load_params(REPO / "params.yaml").data
    with pytest.raises(LowbitError, match="set model.task: causal_lm"):
        load_source("builtin:instructions", data)
    records = tmp_path / "records.jsonl"
    records.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(LowbitError, match=r"column 'text' .* not found.*set model.task: causal_lm"):
        load_source(str(records), data)


def test_quantizing_the_tied_embedding_unties_it_and_both_copies_are_counted(tmp_path):
    from lowbit.measure import weight_bytes
    from lowbit.quant.ptq import quantizable_layers, quantize_int8

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir(tmp_path / "tiny"))
    table = model.model.embed_tokens.weight
    fp32_bytes = weight_bytes(model)
    quantize_int8(model, "weight_only", quantizable_layers(model, ["lm_head"], embeddings=True))
    assert model.lm_head.weight.data_ptr() == table.data_ptr()  # the head kept the float table
    # the head's fp32 copy (vocab x hidden x 4 bytes) stays; the embedding is now int8 (1 byte) plus scales
    vocab, hidden = table.shape
    assert weight_bytes(model) > vocab * hidden * 4 + vocab * hidden
    assert weight_bytes(model) < fp32_bytes + vocab * hidden * 2
