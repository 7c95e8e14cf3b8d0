"""What differs between a classification job and a causal LM job, behind one small interface the training
loop calls: the data, batches, per-example evaluation rows and the metrics made from them.

Both take plain arguments (data, tokenizer, spec sections), so they are testable without Ray or DeepSpeed.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from orchestrator.plan.batches import EVAL_LOSS_CHUNK_ELEMENTS
from orchestrator.spec import JobSpec
from orchestrator.spec.schema import FLASH_KERNELS


class Task(Protocol):
    label_names: list[str] | None

    def size(self, split: str) -> int: ...
    def batch(self, split: str, indices: list[int]) -> tuple[dict[str, Any], int]: ...
    def eval_rows(self, logits, batch: dict[str, Any]) -> list[tuple]: ...
    def metrics(self, rows: list[tuple]) -> dict[str, float]: ...


class Classification:
    """Texts and label indices; metrics: loss, accuracy, macro-F1.

    Every split is tokenized once, in batches (the fast tokenizer's batch call), into one flat int32 array of
    token ids per split plus row offsets (4 bytes a token); a batch only pads its rows. Before, every batch of
    every epoch tokenized its texts again."""

    def __init__(self, data, tokenizer, max_length: int):
        self.data, self.tokenizer, self.max_length = data, tokenizer, max_length
        self.label_names = data.label_names
        self.tokens = {name: tokenize_texts(getattr(data, name).texts, tokenizer, max_length)
                       for name in ("train", "validation", "test") if getattr(data, name) is not None}

    def _split(self, split: str):
        return getattr(self.data, split)

    def size(self, split: str) -> int:
        return len(self._split(split).texts)

    def batch(self, split: str, indices: list[int]) -> tuple[dict[str, Any], int]:
        """Model inputs with labels, and the number of non-padding tokens in them."""
        import torch

        ids, offsets = self.tokens[split]
        rows = [ids[offsets[i]:offsets[i + 1]].tolist() for i in indices]
        batch = dict(self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([self._split(split).labels[i] for i in indices])
        return batch, int(batch["attention_mask"].sum())

    def eval_rows(self, logits, batch: dict[str, Any]) -> list[tuple]:
        import torch

        logits = logits.float()
        losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        return list(zip(logits.argmax(-1).tolist(), batch["labels"].tolist(), losses.tolist()))

    def metrics(self, rows: list[tuple]) -> dict[str, float]:
        from orchestrator.train.metrics import classification_metrics

        result = classification_metrics([r[0] for r in rows], [r[1] for r in rows], len(self.label_names))
        return {**result, "loss": sum(r[2] for r in rows) / len(rows)}


class CausalLM:
    """Tokenised examples (training rows packed when the spec says so); metrics: token-weighted loss and
    perplexity over the trained tokens."""

    label_names = None

    def __init__(self, data, tokenizer, spec: JobSpec):
        from orchestrator.train.lm_data import encode_split, pack

        self.data, self.tokenizer, self.spec = data, tokenizer, spec
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss
        self.rows = {}
        self.dropped = {}
        for name in ("train", "validation", "test"):
            split = getattr(data, name)
            if split is not None:
                self.rows[name], self.dropped[name] = encode_split(split, tokenizer, spec.data)
        if spec.data.packing:
            self.rows["train"] = pack(self.rows["train"], spec.data.max_length)

    def size(self, split: str) -> int:
        return len(self.rows[split])

    def batch(self, split: str, indices: list[int]) -> tuple[dict[str, Any], int]:
        """Model inputs with labels, and the number of real (non-padding) tokens in them. Isolated packing under
        flash attention gets one flattened row (:func:`~orchestrator.train.lm_data.flatten`): flash keeps packed
        examples apart only in a batch of one row; sdpa and eager keep them apart in padded rows."""
        from orchestrator.train.lm_data import collate, flatten

        rows = [self.rows[split][i] for i in indices]
        isolated = split == "train" and self.spec.data.packing and self.spec.data.packing_attention == "isolated"
        tokens = sum(len(r) for r in rows)
        if isolated and self.spec.model.attn_implementation in FLASH_KERNELS:
            return flatten(rows), tokens
        return collate(rows, self.tokenizer.pad_token_id, isolated), tokens

    def eval_rows(self, logits, batch: dict[str, Any]) -> list[tuple]:
        return lm_eval_rows(logits, batch)

    def metrics(self, rows: list[tuple]) -> dict[str, float]:
        return lm_metrics(rows)

    @property
    def prompts_have_special_tokens(self) -> bool:
        return self.data.format == "chat"  # the chat template wrote them

    def sample_prompts(self) -> list[tuple[str, str]]:
        """The fixed prompts generated from at every evaluation: (as a person reads it, as the model sees it,
        rendered with the chat template for chat data)."""
        from orchestrator.train.lm_data import prompt_text, render_chat

        generation = self.spec.generation
        if generation.prompts is not None:
            if self.data.format == "chat":
                return [(p, render_chat(self.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True))
                        for p in generation.prompts]
            return [(p, p) for p in generation.prompts]
        records = self.data.validation.records[:generation.num_prompts]
        return [(_readable(r), prompt_text(r, self.tokenizer)) for r in records]


def lm_eval_rows(logits, batch: dict[str, Any], chunk_elements: int = EVAL_LOSS_CHUNK_ELEMENTS) -> list[tuple]:
    """(summed negative log-likelihood, trained tokens) per row: the prediction of token t+1 at t.

    The loss is taken a slice of positions at a time, so at most ``chunk_elements`` logits are ever in float32
    (with cross-entropy's log-softmax of them): with a 128k vocabulary a full float32 copy of 8 rows x 4,096
    tokens would be 16.8 GB on top of the logits themselves."""
    import torch

    shifted = batch["labels"][:, 1:]
    logits = logits[:, -batch["labels"].shape[1]:]  # prompt tuning prepends virtual tokens' positions
    rows, positions, vocab = shifted.shape[0], shifted.shape[1], logits.shape[-1]
    step = max(1, chunk_elements // max(1, rows * vocab))
    nll = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    for start in range(0, positions, step):
        end = min(positions, start + step)
        part = torch.nn.functional.cross_entropy(logits[:, start:end].float().transpose(1, 2), shifted[:, start:end],
                                                 ignore_index=-100, reduction="none")
        nll += part.sum(-1, dtype=torch.float64)
    counts = (shifted != -100).sum(-1)
    return list(zip(nll.tolist(), counts.tolist()))


def lm_metrics(rows: list[tuple]) -> dict[str, float]:
    """Token-weighted loss over every trained token, and its perplexity."""
    loss = sum(r[0] for r in rows) / max(1, sum(r[1] for r in rows))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _readable(record: dict[str, Any]) -> str:
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "user"][-1]
    return record.get("prompt") or " ".join(record["text"].split()[:max(1, len(record["text"].split()) // 2)])


def tokenize_texts(texts: list[str], tokenizer, max_length: int, chunk: int = 2048):
    """Token ids of every text, truncated to ``max_length``, as (flat int32 ids, int64 row offsets of length
    n + 1): what :meth:`Classification.batch` pads from."""
    from itertools import chain

    import numpy as np

    pieces, lengths = [], []
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length)["input_ids"]
        sizes = [len(row) for row in encoded]
        pieces.append(np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=sum(sizes)))
        lengths += sizes
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int32)), offsets


def make_task(spec: JobSpec, data, tokenizer) -> Classification | CausalLM:
    if spec.model.task == "causal_lm":
        return CausalLM(data, tokenizer, spec)
    return Classification(data, tokenizer, spec.data.max_length)


def load_data(spec: JobSpec):
    """The job's data: :class:`orchestrator.train.data.TaskData` or :class:`orchestrator.train.lm_data.LMData`."""
    if spec.model.task == "causal_lm":
        from orchestrator.train.lm_data import load_lm_data

        return load_lm_data(spec.data)
    from orchestrator.train.data import load_task_data

    return load_task_data(spec.data)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, add_special_tokens: bool = True,
             synced: bool = False, device=None) -> list[str]:
    """Greedy completions, one prompt at a time (no padding subtleties; a handful of prompts). ``synced``: every
    ZeRO-3 rank must run the same forward passes, as their parameters are partitioned. ``device``: where the
    inputs go (training: the engine's; default, the first parameter's, which is the CPU under ZeRO-3 parameter
    offload while the forward pass runs on the GPU)."""
    import torch

    completions = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
            where = device or next(model.parameters()).device
            out = model.generate(input_ids=ids["input_ids"].to(where),
                                 attention_mask=ids["attention_mask"].to(where), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                 use_cache=True, synced_gpus=synced)
            completions.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return completions
