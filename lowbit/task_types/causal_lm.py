"""Causal LM: instruction tuning a chat model, forward or reversed ("given the response, predict the instruction").

An example is a prompt and a target. The prompt goes through the tokenizer's chat template as a
user turn with the generation prompt appended; the target follows, then the end-of-turn token:

    input_ids = template(user: prompt) + tokens(target) + [eot]
    labels    = [-100] * len(template(user: prompt)) + tokens(target) + [eot]

The loss covers the target and the end-of-turn token only, masked by position: SmolLM2's pad token
is its end-of-turn token, so masking by token id would stop the model from ever learning to end its
answer. A tokenizer without a chat template gets PLAIN_TEMPLATE (said once per process).

Records are `instruction`, optional `input`, `output` (Alpaca style). With data.reverse the roles
swap: the prompt is REVERSE_PROMPT around the response (and the input, when present), the target
is the instruction. Examples longer than model.max_length are dropped before splitting and counted:
a truncated target would lose its end-of-turn token, and reversed records (long response first)
are hit hardest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from lowbit.config import DataParams, ModelParams, PrepareParams
from lowbit.errors import LowbitError
from lowbit.models import load_auto, model_device
from lowbit.task_types.sampling import training_order

AUTO_MODEL = AutoModelForCausalLM
HEAD = ["lm_head"]  # tied to the embeddings in small chat models: kept in float, not trained by adapters
ADAPTER_TRAINED_IN_FULL: list[str] | None = None
PEFT_TASK = TaskType.CAUSAL_LM
VALIDATION_METRIC = "token_accuracy"
RECORD_COLUMNS = ("instruction", "input", "output")
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
REVERSE_PROMPT = "Write the instruction that this response answers.\n\nResponse:\n{output}"
IGNORE = -100  # the label value transformers' loss skips


def prompt_and_target(instruction: str, extra: str, output: str, reverse: bool) -> tuple[str, str]:
    """(prompt, target) of one record; `extra` is the record's optional input ("" when none)."""
    if reverse:
        prompt = REVERSE_PROMPT.format(output=output)
        return (f"{prompt}\n\nInput:\n{extra}" if extra else prompt), instruction
    return (f"{instruction}\n\n{extra}" if extra else instruction), output


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends an assistant turn: the tokenizer's eos (SmolLM2's <|im_end|>, Mistral's </s>)."""
    if tokenizer.eos_token_id is None:
        raise LowbitError(f"tokenizer {tokenizer.name_or_path}: no eos token, so an answer cannot be taught to end; "
                          "use a chat model's tokenizer")
    return int(tokenizer.eos_token_id)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    if not tokenizer.chat_template:
        return tokenizer(PLAIN_TEMPLATE.format(prompt=prompt))["input_ids"]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def encode(tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, unpadded: the labels are the target's tokens and the eot."""
    context = prompt_ids(tokenizer, prompt)
    answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    return context + answer, [IGNORE] * len(context) + answer


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def collate(examples: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and labels by position."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def make_loader(tokenizer: PreTrainedTokenizerBase, frame: pd.DataFrame, batch_size: int, max_length: int,
                shuffle: bool = False, seed: int = 0, group_by_length: bool = False) -> DataLoader:
    """Batches of encoded examples; the prepare stage dropped every example over max_length, so none is cut here.
    `group_by_length` (with `shuffle`): examples of similar length share batches (lowbit.task_types.sampling)."""
    examples = [encode(tokenizer, p, t) for p, t in zip(frame["prompt"], frame["target"])]
    too_long = [i for i, (ids, _) in enumerate(examples) if len(ids) > max_length]
    if too_long:
        raise LowbitError(f"{len(too_long)} example(s) are longer than model.max_length={max_length} tokens "
                          f"(the first: row {too_long[0]}); prepare drops them: rerun it with this max_length")
    order = None  # in row order
    if shuffle:
        order = training_order(len(examples), batch_size, seed, [len(ids) for ids, _ in examples] if group_by_length else None)
    pad = pad_id(tokenizer)
    return DataLoader(examples, batch_size=batch_size, sampler=order, collate_fn=lambda batch: collate(batch, pad))


def token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per example: summed NLL of the target tokens, their count, how many were ranked first; per target
    token: the top-ranked token's probability and whether it was right. Logits at t predict token t + 1."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    # one vocabulary-sized copy (log-probabilities) per batch: logits dominate evaluation memory at 49k tokens
    log_probabilities = logits.log_softmax(-1)
    nll = -log_probabilities.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    top_log_probability, top = log_probabilities.max(-1)
    top_probability = top_log_probability.exp()
    correct = (top == labels) & mask
    return {"nll": (nll * mask).sum(1).numpy(), "tokens": mask.sum(1).numpy(), "correct": correct.sum(1).numpy(),
            "token_confidence": top_probability[mask].numpy(), "token_correct": correct[mask].numpy()}


@torch.no_grad()
def score_examples(model: torch.nn.Module, loader: DataLoader) -> dict[str, np.ndarray]:
    """token_statistics over a loader, teacher-forced, concatenated."""
    model.eval()
    device = model_device(model)
    parts = []
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()
        parts.append(token_statistics(logits, labels))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def token_figures(sums: dict[str, np.ndarray]) -> dict[str, float]:
    """token_accuracy (the share of target tokens predicted right, teacher-forced), loss (mean NLL per
    target token) and perplexity = exp(loss), from score_examples' per-example sums."""
    loss = float(sums["nll"].sum() / sums["tokens"].sum())
    return {"token_accuracy": float(sums["correct"].sum() / sums["tokens"].sum()), "loss": loss,
            "perplexity": math.exp(loss)}


def validation_figures(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    return token_figures(score_examples(model, loader))


def validation_score(model: torch.nn.Module, loader: DataLoader) -> float:
    return validation_figures(model, loader)[VALIDATION_METRIC]


def load_pretrained(source: str, model: ModelParams, meta: dict | None = None, **kwargs) -> torch.nn.Module:
    return load_auto(AUTO_MODEL, source, model, **kwargs)


# -- data --------------------------------------------------------------------------------------


def instruction_records(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """instruction / input / output as strings; a missing `input` column means no inputs."""
    if "label" in frame.columns and "instruction" not in frame.columns:
        raise LowbitError(f"{source}: labelled rows (a `label` column) but model.task is causal_lm, which needs "
                          "instruction records (instruction, optional input, output); set model.task: "
                          "sequence_classification, or point data.source at instruction data")
    for column in ("instruction", "output"):
        if column not in frame.columns:
            raise LowbitError(f"{source}: no `{column}` column; instruction records need instruction, optional input, "
                              f"output (columns here: {', '.join(map(str, frame.columns))})")
    extra = frame["input"] if "input" in frame.columns else pd.Series([""] * len(frame))
    return pd.DataFrame({"instruction": frame["instruction"].astype("string").str.strip(),
                         "input": extra.fillna("").astype("string").str.strip().to_numpy(),
                         "output": frame["output"].astype("string").str.strip()})


def load_records(source: str, data: DataParams, key: str = "data.source") -> pd.DataFrame:
    from lowbit.builtin_instructions import BUILTIN_INSTRUCTIONS
    from lowbit.data import load_file, load_hub_dataset

    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_INSTRUCTIONS:
            raise LowbitError(f"params.yaml: {key}: {source!r} is not an instruction dataset (model.task is causal_lm); "
                              f"builtin instruction datasets: {', '.join('builtin:' + n for n in BUILTIN_INSTRUCTIONS)}")
        return BUILTIN_INSTRUCTIONS[name](data.builtin_rows, data.seed)
    frame = load_hub_dataset(source.removeprefix("hf:"), key) if source.startswith("hf:") else load_file(
        Path(source), key, data.header)
    return instruction_records(frame, source)


def to_examples(records: pd.DataFrame, data: DataParams, tokenizer: PreTrainedTokenizerBase, max_length: int,
                report, source: str) -> pd.DataFrame:
    """prompt / target / tokens per usable record; empty, duplicate and too-long records dropped and counted."""
    report.rows_in += len(records)
    empty = records["instruction"].isna() | (records["instruction"] == "") | records["output"].isna() | (records["output"] == "")
    if empty.any():
        first = int(np.flatnonzero(empty.to_numpy())[0])
        report.notes.append(f"dropped {int(empty.sum())} record(s) with an empty instruction or output (first: row {first})")
    report.dropped_empty_text += int(empty.sum())
    records = records[~empty]
    pairs = [prompt_and_target(i, x, o, data.reverse) for i, x, o in zip(records["instruction"], records["input"], records["output"])]
    frame = pd.DataFrame(pairs, columns=["prompt", "target"])
    duplicate = frame.duplicated()
    report.dropped_duplicates += int(duplicate.sum())
    frame = frame[~duplicate].reset_index(drop=True)
    if frame.empty:
        raise LowbitError(f"{source}: no usable records (every instruction or output is empty)")
    frame["tokens"] = [len(encode(tokenizer, p, t)[0]) for p, t in zip(frame["prompt"], frame["target"])]
    too_long = frame["tokens"] > max_length
    report.dropped_too_long += int(too_long.sum())
    if too_long.all():
        raise LowbitError(f"{source}: every example is longer than model.max_length={max_length} tokens (the longest: "
                          f"{int(frame['tokens'].max())}, the shortest: {int(frame['tokens'].min())}); raise model.max_length")
    if too_long.any():
        report.notes.append(f"dropped {int(too_long.sum())} example(s) longer than model.max_length={max_length} tokens "
                            f"(longest {int(frame['tokens'].max())}): a cut target would lose its end-of-turn token")
    return frame[~too_long].reset_index(drop=True)


def prepare_splits(data: DataParams, prep: PrepareParams, model: ModelParams):
    from lowbit.data import CleanReport, Splits, outside_test_and_sampled
    from lowbit.models import load_tokenizer, resolve_model

    report = CleanReport()
    tokenizer = load_tokenizer(resolve_model(model.name), model)
    if not tokenizer.chat_template:
        report.notes.append(f"{model.name} has no chat template: prompts use lowbit's plain template "
                            f"{PLAIN_TEMPLATE!r} (lowbit/task_types/causal_lm.py)")
    frame = to_examples(load_records(data.source, data), data, tokenizer, model.max_length, report, data.source)
    test = None
    if data.test_source:
        test = to_examples(load_records(data.test_source, data, "data.test_source"), data, tokenizer, model.max_length,
                           report, data.test_source)
    frame = outside_test_and_sampled(frame, test, "prompt", data, report)
    frame = frame.sample(frac=1.0, random_state=data.seed).reset_index(drop=True)  # splits take slices of a shuffle
    if test is None:
        n_test = max(2, round(prep.test_fraction * len(frame)))
        test, frame = frame.iloc[:n_test].reset_index(drop=True), frame.iloc[n_test:].reset_index(drop=True)
    n_val = max(2, round(prep.val_fraction * (len(frame) + (0 if data.test_source else len(test)))))
    val, train = frame.iloc[:n_val].reset_index(drop=True), frame.iloc[n_val:].reset_index(drop=True)
    if len(train) < 2:
        raise LowbitError(f"{data.source}: {len(train)} training example(s) left after the test and validation splits; "
                          "give more records (data.builtin_rows, data.max_rows) or lower the fractions")
    if prep.calib_size > len(train):
        raise LowbitError(f"params.yaml: prepare.calib_size: {prep.calib_size} exceeds the {len(train)} training rows; lower it")
    calib = train.sample(n=prep.calib_size, random_state=data.seed).reset_index(drop=True)
    return Splits(train, val, test, calib, [], report)
