"""Tiny random models for fast unit tests: a BERT classifier (MiniLM's tokenizer) and a Llama chat model
(SmolLM2's tokenizer, cut to 1024 tokens)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

from lowbit.gguf import embedded_smollm2_gguf
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



SMALL_VOCAB = 1024


@functools.cache
def small_chat_tokenizer() -> PreTrainedTokenizerFast:
    """SmolLM2's byte-level BPE (from the embedded GGUF, offline) keeping ids < SMALL_VOCAB and the merges
    that build them: a valid BPE, as if training had stopped early, with the same specials (pad == eos ==
    <|im_end|>) and chat template. A 1024-row vocabulary keeps a tiny model's logits small: with 49k
    rows they dominate every step."""
    path = embedded_smollm2_gguf()
    full = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # ~4 s, once per process
    spec = json.loads(full.backend_tokenizer.to_str())
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if index < SMALL_VOCAB}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [pair for pair in spec["model"]["merges"]
                               if pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab]
    small = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=full.bos_token, eos_token=full.eos_token,
        unk_token=full.unk_token, pad_token=full.pad_token,
    )
    small.chat_template = full.chat_template
    return small


def tiny_llama_dir(root: Path, tokenizer=None, intermediate_size: int = 128, tied: bool = True, seed: int = 0,
                   init_std: float = 0.02) -> Path:
    """A random 2-layer Llama chat model (grouped-query attention, tied embeddings unless `tied` is false) with
    small_chat_tokenizer(): every causal_lm stage runs on it in seconds. Hidden size 64: bitsandbytes' CPU
    layouts need 64 or more."""
    tokenizer = tokenizer or small_chat_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=intermediate_size, max_position_embeddings=256, tie_word_embeddings=tied,
        initializer_range=init_std, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root
