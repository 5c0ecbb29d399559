"""Training data: JSONL records -> token ids with labels on the answers only.

Two record shapes, one per line:

* chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`. Every
  assistant message is one training example: the messages before it are the prompt.
* ADGEN-style pairs (the published P-Tuning recipe's data): `{"content": "...", "summary": "..."}`,
  a one-turn chat (the key names can be changed).

The prompt text and ids come from the tokenizer that owns the chat format
(`tokenizer.apply_chat_template(..., add_generation_prompt=True)`, which for ChatGLM2 renders
`build_prompt(query, history)` with the `[gMASK] sop` prefix), so training sees exactly the ids
`model.chat` feeds at inference. The answer is `tokenizer.encode(answer, add_special_tokens=False)`
followed by eos, as the published recipe encoded it; only those ids are scored (labels are -100 on
the prompt and on padding).

Over-long examples are truncated and reported, never silently: a prompt keeps its special prefix and
its LAST tokens (the question and the `答：` it ends with, dropping the oldest history); an answer
keeps its first tokens and then gets no eos (the text goes on, so the model is not taught to stop
there).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A record the tool cannot use; the message names the file and line."""


@dataclass
class Example:
    input_ids: list
    labels: list
    record: str  # "file:line"
    turn: int  # which assistant message of the record, from 1


@dataclass
class TruncationReport:
    max_source_length: int
    max_target_length: int
    prompts: list = field(default_factory=list)  # ("file:line", turn, original length)
    answers: list = field(default_factory=list)

    @property
    def count(self):
        return len({(record, turn) for record, turn, _ in self.prompts + self.answers})

    def describe(self, total):
        """One paragraph for the log; empty when nothing was cut."""
        if not self.count:
            return ""
        parts = [f"{self.count} of {total} examples were truncated"]
        for what, items, limit, how in (
            ("prompts", self.prompts, self.max_source_length, "oldest tokens dropped"),
            ("answers", self.answers, self.max_target_length, "end dropped, no eos"),
        ):
            if items:
                where = ", ".join(f"{record}" + (f" (turn {turn})" if turn > 1 else "") for record, turn, _ in items)
                longest = max(length for _, _, length in items)
                parts.append(
                    f"{len(items)} {what} longer than {limit} tokens (longest {longest}; {how}) in {where}"
                )
        return "; ".join(parts) + " (file:line). Raise --max-source-length / --max-target-length to keep them whole."


def _check_message(message, where, index):
    if not isinstance(message, dict):
        raise DataError(f"{where}: messages[{index}] must be an object with 'role' and 'content'")
    for key in ("role", "content"):
        if not isinstance(message.get(key), str):
            raise DataError(f"{where}: messages[{index}] needs a string {key!r}")


def record_turns(record, where, prompt_column, response_column):
    """[(messages before the answer, answer)] for one parsed record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for index, message in enumerate(messages):
            _check_message(message, where, index)
        turns = [
            (messages[:index], message["content"])
            for index, message in enumerate(messages)
            if message["role"] == "assistant"
        ]
        if not turns:
            raise DataError(f"{where}: no assistant message to learn from")
        if not turns[0][0]:
            raise DataError(f"{where}: the first assistant message has no message before it to answer")
        return turns
    if prompt_column in record or response_column in record:
        prompt, answer = record.get(prompt_column), record.get(response_column)
        for key, value in ((prompt_column, prompt), (response_column, answer)):
            if not isinstance(value, str):
                raise DataError(f"{where}: {key!r} must be a string")
        return [([{"role": "user", "content": prompt}], answer)]
    raise DataError(
        f"{where}: a record needs 'messages' (chat) or {prompt_column!r} and {response_column!r} (prompt/answer pair);"
        f" found keys {sorted(record)}"
    )


def read_records(path, prompt_column="content", response_column="summary"):
    """[("file:line", [(messages, answer)])] of a JSONL file; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        records.append((where, record_turns(record, where, prompt_column, response_column)))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def prompt_ids(tokenizer, messages):
    """The ids `chat` feeds for `messages` followed by the assistant's turn, from the tokenizer's chat format."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode(tokenizer, records, max_source_length, max_target_length):
    """(examples, TruncationReport) for `records` from read_records."""
    if max_source_length < 1 or max_target_length < 1:
        raise ValueError("max_source_length and max_target_length must be at least 1")
    # What the tokenizer puts in front of any text ([gMASK] sop): kept when a prompt is cut.
    prefix = tokenizer.build_inputs_with_special_tokens([])
    if max_source_length <= len(prefix):
        raise ValueError(f"max_source_length must leave room after the {len(prefix)} prefix tokens")
    report = TruncationReport(max_source_length, max_target_length)
    examples = []
    for where, turns in records:
        for turn, (messages, answer) in enumerate(turns, start=1):
            try:
                prompt = prompt_ids(tokenizer, messages)
            except Exception as error:  # the template's own message names what is wrong
                raise DataError(f"{where}: the chat template refused this record: {error}") from None
            if len(prompt) > max_source_length:
                report.prompts.append((where, turn, len(prompt)))
                keep = max_source_length - len(prefix)
                prompt = prompt[: len(prefix)] + prompt[-keep:]
            target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            if len(target) > max_target_length:
                report.answers.append((where, turn, len(target)))
                target = target[:max_target_length]
            examples.append(Example(prompt + target, [IGNORE_INDEX] * len(prompt) + target, where, turn))
    return examples, report


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


class Collator:
    """Pads a batch with the tokenizer (on the left, with `position_ids`); labels get -100 there."""

    def __init__(self, tokenizer, pad_to_multiple_of=None):
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features):
        batch = self.tokenizer.pad(
            {"input_ids": [feature["input_ids"] for feature in features]},
            padding=True,
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding_side="left",  # the labels below are placed on the left; a tokenizer may be set to "right"
            return_tensors="pt",
        )
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            labels[row, width - len(feature["labels"]) :] = torch.tensor(feature["labels"], dtype=torch.long)
        batch["labels"] = labels
        return batch


def describe_example(tokenizer, example, index):
    """A readable view of one encoded example: each token, its id, and whether (and to what) it is scored."""
    scored = sum(label != IGNORE_INDEX for label in example.labels)
    prompt_end = next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))
    lines = [
        f"example {index} (record {example.record}, answer {example.turn}): {len(example.input_ids)} tokens, "
        f"{scored} scored",
        f"  prompt (labels -100): {tokenizer.decode(example.input_ids[:prompt_end], skip_special_tokens=True)!r}",
        f"  answer (scored)     : {tokenizer.decode(example.input_ids[prompt_end:], skip_special_tokens=True)!r}"
        + (" + eos" if example.input_ids[-1] == tokenizer.eos_token_id else " (truncated, no eos)"),
        "  pos     id  label  token",
    ]
    tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
    for position, (token_id, label, token) in enumerate(zip(example.input_ids, example.labels, tokens)):
        mark = "  -100" if label == IGNORE_INDEX else f"{label:6d}"
        lines.append(f"  {position:3d} {token_id:6d} {mark}  {token!r}")
    return "\n".join(lines)
