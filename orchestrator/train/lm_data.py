"""Causal LM data: prompt/completion pairs, chat messages or plain text, rendered to token ids and loss labels.

Rendering is text-first: an example becomes one string (the chat template for messages, prompt + completion +
EOS otherwise) plus the character spans that are trained; tokens are trained when they overlap a trained span
(the tokenizer's offsets say where each token came from), so a token merged across the prompt/completion
boundary is trained rather than lost. Labels use -100 for every token that carries no loss.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from orchestrator.spec import DataSpec, SpecError
from orchestrator.train.data import (
    file_digest,
    locate,
    mixed,
    read_table,
    train_digest,
    train_source,
    validation_cut,
)

IGNORE = -100  # the label of a token that carries no loss (PyTorch's cross-entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class LMSplit:
    """One split: ``records`` are {"prompt", "completion"}, {"messages"} or {"text"} dicts, by format."""

    name: str
    source: str
    records: list[dict[str, Any]]
    digest: str

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class LMData:
    format: str
    train: LMSplit
    validation: LMSplit
    test: LMSplit | None
    label_names: None = None  # a causal LM has no label set; kept so drivers treat both kinds of data alike


@dataclass(frozen=True)
class Encoded:
    """One tokenised example (or a packed row of several): ids, labels, and where each example starts."""

    input_ids: list[int]
    labels: list[int]
    starts: tuple[int, ...] = (0,)  # offsets of the examples in a packed row

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------- reading


def detect_format(columns: list[str], spec: DataSpec) -> str:
    if spec.format != "auto":
        return spec.format
    if spec.messages_column in columns:
        return "chat"
    if spec.prompt_column in columns and spec.completion_column in columns:
        return "prompt_completion"
    if spec.text_column in columns:
        return "text"
    raise SpecError(f"data.format: cannot tell the format of {spec.train} from its columns ({', '.join(columns)}); "
                    f"a causal LM reads '{spec.messages_column}' (chat), '{spec.prompt_column}' + "
                    f"'{spec.completion_column}', or '{spec.text_column}'; set data.format and the column names")


def _records(path: str, field: str, fmt: str, spec: DataSpec, frame=None) -> list[dict[str, Any]]:
    frame = read_table(path, field) if frame is None else frame
    if len(frame) == 0:
        raise SpecError(f"{field}: {path} has no rows")
    needed = {"chat": [("data.messages_column", spec.messages_column)],
              "prompt_completion": [("data.prompt_column", spec.prompt_column),
                                    ("data.completion_column", spec.completion_column)],
              "text": [("data.text_column", spec.text_column)]}[fmt]
    for key, column in needed:
        if column not in frame.columns:
            raise SpecError(f"{key}: column '{column}' is not in {path} (columns: {', '.join(map(str, frame.columns))})"
                            f"; set {key}, or data.format to the format the file has")
    records = []
    for row, values in enumerate(frame[[c for _, c in needed]].itertuples(index=False), start=1):
        where = f"{field}: {locate(frame, path, row - 1)}"
        if fmt == "chat":
            records.append({"messages": _messages(values[0], where)})
        elif fmt == "prompt_completion":
            prompt, completion = values
            if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
                raise SpecError(f"{where}: '{spec.prompt_column}' must be text and '{spec.completion_column}' "
                                "non-empty text")
            records.append({"prompt": prompt, "completion": completion})
        else:
            if not isinstance(values[0], str) or not values[0].strip():
                raise SpecError(f"{where}: '{spec.text_column}' is empty or not text")
            records.append({"text": values[0]})
    return records


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if hasattr(value, "tolist"):  # parquet and datasets give numpy arrays of dicts
        value = value.tolist()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise SpecError(f"{where}: messages is text that is not JSON; give a list of "
                            '{"role": ..., "content": ...}') from None
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: messages must be a non-empty list of {{role, content}}")
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise SpecError(f"{where}: each message needs a role ({', '.join(ROLES)}) and text content; "
                            f"got {turn!r:.80}")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SpecError(f"{where}: no assistant message with content; there is nothing to learn from it")
    return messages


def read_records(path: str, field: str, spec: DataSpec) -> tuple[str, list[dict[str, Any]]]:
    """A file's format (``spec.format``, or detected from its columns) and its checked records."""
    frame = read_table(path, field)
    fmt = detect_format(list(map(str, frame.columns)), spec.model_copy(update={"train": path}))
    return fmt, _records(path, field, fmt, spec, frame)


def load_lm_data(spec: DataSpec) -> LMData:
    """Reads and checks every split of a causal LM job.

    Raises:
        SpecError: naming the file, row or column at fault.
    """
    if spec.train is None:
        raise SpecError("data.train: not given")
    formats = {}

    def read(path: str, field: str) -> list[dict[str, Any]]:
        formats[field], records = read_records(path, field, spec)
        return records

    train = mixed(spec, read)
    fmt = next(iter(formats.values()))
    if len(set(formats.values())) > 1:
        raise SpecError(f"data.train: the mixture's sources have different formats ({formats}); set data.format, "
                        "or give every source the same columns")
    if spec.validation_split:
        held = set(validation_cut(len(train), spec.validation_split))
        val = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
        validation = LMSplit("validation", f"{train_source(spec)}#validation_split={spec.validation_split}", val,
                             hashlib.sha256(json.dumps(val).encode()).hexdigest())
    else:
        validation = LMSplit("validation", spec.validation, _records(spec.validation, "data.validation", fmt, spec),
                             file_digest(spec.validation))
    test = None
    if spec.test:
        test = LMSplit("test", spec.test, _records(spec.test, "data.test", fmt, spec), file_digest(spec.test))
    return LMData(fmt, LMSplit("train", train_source(spec), train, train_digest(spec)), validation, test)


# ---------------------------------------------------------------------------------------------- rendering


def render(record: dict[str, Any], tokenizer, train_on: str) -> tuple[str, list[tuple[int, int]], bool]:
    """The example as one string, the character spans that carry loss, and whether the string already holds
    the tokenizer's special tokens (a chat template writes them itself)."""
    eos = tokenizer.eos_token or ""
    if "messages" in record:
        messages = record["messages"]
        text = render_chat(tokenizer, messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            through = render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise SpecError("model.path: the tokenizer's chat template does not render a conversation as a "
                                "prefix of its continuation; assistant turns cannot be located for masking "
                                "(use data.train_on: all, or prompt_completion data)")
            # The turn ends at the template's end-of-turn token; whitespace after it is never generated.
            spans.append((len(before), len(through.rstrip())))
        return text, [(0, len(text))] if train_on == "all" else spans, True
    if "prompt" in record:
        text = record["prompt"] + record["completion"] + eos
        return text, [(0 if train_on == "all" else len(record["prompt"]), len(text))], False
    text = record["text"] + eos
    return text, [(0, len(text))], False


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise SpecError("data.format: chat data needs a tokenizer with a chat template; the model folder has none "
                        "(use prompt_completion data, or a model whose tokenizer_config.json has chat_template)")
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(record: dict[str, Any], tokenizer) -> str:
    """What generation starts from: the conversation up to its last assistant turn, or the prompt, or the
    first half of a text's words."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return render_chat(tokenizer, messages[:last], add_generation_prompt=True)
    if "prompt" in record:
        return record["prompt"]
    words = record["text"].split()
    return " ".join(words[:max(1, len(words) // 2)])


def reference_text(record: dict[str, Any]) -> str | None:
    """What the model should answer to :func:`prompt_text`: the last assistant turn, or the completion; a text
    record has none."""
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"][-1]
    return record.get("completion")


def encode(record: dict[str, Any], tokenizer, max_length: int, train_on: str) -> Encoded:
    """Token ids and labels (-100 outside the trained spans), truncated to ``max_length`` tokens."""
    text, spans, has_specials = render(record, tokenizer, train_on)
    tokens = tokenizer(text, add_special_tokens=not has_specials, return_offsets_mapping=True,
                       truncation=True, max_length=max_length)
    labels = [token if any(start < end_ and end > start_ for start_, end_ in spans) and end > start else IGNORE
              for token, (start, end) in zip(tokens["input_ids"], tokens["offset_mapping"])]
    return Encoded(list(tokens["input_ids"]), labels)


def encode_split(split: LMSplit, tokenizer, spec: DataSpec) -> tuple[list[Encoded], int]:
    """Every example of a split, and how many were dropped because truncation left no trained token."""
    encoded = [encode(r, tokenizer, spec.max_length, spec.train_on) for r in split.records]
    kept = [e for e in encoded if trained_tokens(e)]
    if not kept:
        raise SpecError(f"data.max_length: at {spec.max_length} tokens no example of {split.source} keeps a trained "
                        "token (the prompts fill the whole length); raise data.max_length")
    return kept, len(encoded) - len(kept)


def trained_tokens(example: Encoded) -> int:
    # The first token is never predicted (nothing precedes it), in a row of its own or packed.
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def pack(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Greedy packing in order: whole examples into rows of at most ``max_length`` tokens. The first token of
    each example gets no label, so no loss is computed across an example boundary."""
    rows: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example) > max_length:
            rows.append(Encoded(ids, labels, tuple(starts)))
            ids, labels, starts = [], [], []
        starts.append(len(ids))
        ids = ids + example.input_ids
        labels = labels + [IGNORE] + example.labels[1:]
    if ids:
        rows.append(Encoded(ids, labels, tuple(starts)))
    return rows


def collate(rows: list[Encoded], pad_id: int, isolated: bool) -> dict[str, Any]:
    """Right-padded tensors for a micro-batch. Packed rows with isolated attention carry position ids that
    restart at every example and no attention mask: transformers then builds a block-diagonal causal mask
    (``find_packed_sequence_indices``), so an example never attends to the one before it."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row.input_ids)
        labels[i, :len(row)] = torch.tensor(row.labels)
        mask[i, :len(row)] = 1
        bounds = [*row.starts, width]
        for start, end in zip(bounds, bounds[1:]):
            positions[i, start:end] = torch.arange(end - start)
    batch = {"input_ids": input_ids, "labels": labels, "use_cache": False}
    if isolated:
        batch["position_ids"] = positions  # padding continues the last example's positions, after all its tokens
    else:
        batch["attention_mask"] = mask
    return batch


def flatten(rows: list[Encoded]) -> dict[str, Any]:
    """A padding-free micro-batch: every example of ``rows`` concatenated into one row (shape 1 x total tokens),
    position ids restarting at each example, each example's first token unlabeled, no padding and no attention
    mask (the semantics of transformers' ``DataCollatorWithFlattening``).

    Isolated packing under flash attention needs it: transformers finds the examples from restarting position
    ids only in a batch of one row (``_is_packed_sequence`` in modeling_flash_attention_utils) and then runs the
    variable-length kernel over them; with more rows it runs plain causal attention over each whole row.
    sdpa and eager give the same result from the same inputs (a block-diagonal causal mask).
    """
    import torch

    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row in rows:
        bounds = [*row.starts, len(row)]
        for start, end in zip(bounds, bounds[1:]):
            input_ids += row.input_ids[start:end]
            labels += [IGNORE] + row.labels[start + 1:end]  # nothing predicted from the example before
            positions += range(end - start)
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "use_cache": False}


def show(example: Encoded, tokenizer, width: int = 100) -> str:
    """The rendered tokens with trained spans in [[...]] and the rest as plain text: what `validate` prints."""
    out, segment, trained = [], [], False
    for token, label in [*zip(example.input_ids, example.labels), (None, None)]:
        now = label is not None and label != IGNORE
        if now != trained or token is None:
            text = tokenizer.decode(segment)
            out.append(f"[[{text}]]" if trained and segment else text)
            segment, trained = [], now
        segment.append(token)
    text = "".join(out)
    return text if len(text) <= width * 12 else text[:width * 12] + " ..."
