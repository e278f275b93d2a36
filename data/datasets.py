"""Map-style torch Datasets for the MiniMind formats: pretrain, SFT (chat) and DPO (preference pairs).

Each item is read from disk and tokenized on demand (`data.jsonl.JsonlFile`), so memory does not grow
with the file, and the same index always gives the same tensors (no randomness here: shuffling is
the sampler's job). Padding/packing happens in `data.collate`.

SFT loss mask. The conversation is rendered with `vlm.tokenizer.render_chat` (the exact text the
chat template produces at inference) and tokenized once with character offsets. A token is
supervised iff it *starts* inside an assistant turn's content or is that turn's closing
`<|im_end|>`; the `<|im_start|>assistant\\n` header and the `\\n` after `<|im_end|>` are not. The mask
comes from character positions, never from token values, so it is right even when the tokenizer's
pad token is the end token.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.jsonl import DataError, JsonlFile
from vlm.tokenizer import BOS_ID, CONTENT_SEP, EOS_ID, EOS_TOKEN, ROLES, render_chat, turn_prefix

IGNORE_INDEX = -100


# ---------------------------------------------------------------- record checks (raise with a short reason)

def check_pretrain(rec: dict) -> None:
    if "text" not in rec:
        raise ValueError("missing field 'text'")
    if not isinstance(rec["text"], str):
        raise TypeError(f"field 'text' must be a string, got {type(rec['text']).__name__}")


def check_messages(messages, field: str = "conversations") -> None:
    """A non-empty list of {role, content} turns with known roles and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field '{field}' must be a non-empty list of messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"{field}[{k}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ValueError(f"{field}[{k}]: unknown or missing role {m.get('role')!r} (expected one of {ROLES})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{field}[{k}]: missing field 'content' (a string)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"field '{field}' has no assistant turn (nothing to learn)")


def check_sft(rec: dict) -> None:
    if "conversations" not in rec:
        raise ValueError("missing field 'conversations'")
    check_messages(rec["conversations"])


def check_dpo(rec: dict) -> None:
    for side in ("chosen", "rejected"):
        if side not in rec:
            raise ValueError(f"missing field '{side}'")
        check_messages(rec[side], side)


# ---------------------------------------------------------------- encoding

def encode_text(tokenizer, text: str, max_len: int) -> dict[str, torch.Tensor]:
    """`<|im_start|>` + text + `<|im_end|>`, cut to max_len; every token is a target."""
    ids = [BOS_ID] + tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS_ID]
    ids = torch.tensor(ids[:max_len], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def supervised_spans(messages: list[dict]) -> list[tuple[int, int]]:
    """Character spans of render_chat(messages) to learn: each assistant content (with the space
    before it, which the model writes) + its `<|im_end|>`."""
    spans, pos = [], 0
    for m in messages:
        head = len(turn_prefix(m["role"]))
        body = len(CONTENT_SEP) + len(m["content"]) + len(EOS_TOKEN)
        if m["role"] == "assistant":
            spans.append((pos + head, pos + head + body))
        pos += head + body + 1  # + the "\n" that closes every turn
    return spans


def encode_conversation(tokenizer, messages: list[dict], max_len: int) -> dict[str, torch.Tensor]:
    """Token ids of the chat-rendered conversation and labels that supervise only assistant turns.

    Truncation keeps the first max_len tokens. If that would leave no supervised token (a long
    context before the first answer), the window slides right instead and ends at the last
    supervised token: the answer and its nearest context survive, the oldest context is dropped.
    An SFT sample is only useful with at least one target; this keeps every record useful.
    """
    check_messages(messages, "messages")
    text = render_chat(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    starts = [s for s, _ in enc["offset_mapping"]]
    spans = supervised_spans(messages)
    labels, k = [], 0
    for tok, s in zip(ids, starts):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        labels.append(tok if k < len(spans) and spans[k][0] <= s else IGNORE_INDEX)
    lo = 0
    if len(ids) > max_len and all(l == IGNORE_INDEX for l in labels[:max_len]):
        last = max(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
        lo = last + 1 - max_len
    return {"input_ids": torch.tensor(ids[lo:lo + max_len], dtype=torch.long),
            "labels": torch.tensor(labels[lo:lo + max_len], dtype=torch.long)}


# ---------------------------------------------------------------- datasets

class _JsonlDataset(Dataset):
    check = staticmethod(check_pretrain)

    def __init__(self, path: str | Path, tokenizer, max_len: int, skip_bad: bool = False):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.file = JsonlFile(path, skip_bad=skip_bad, validate=self.check)
        self.tokenizer = tokenizer
        self.max_len = max_len
        if len(self.file) == 0:
            raise DataError(f"{path}: no usable records")

    @property
    def n_skipped(self) -> int:
        return self.file.n_skipped

    def __len__(self) -> int:
        return len(self.file)


class PretrainDataset(_JsonlDataset):
    """`{"text": ...}` jsonl -> {"input_ids", "labels"} (labels == input_ids; padding is masked by the collate)."""
    check = staticmethod(check_pretrain)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return encode_text(self.tokenizer, self.file[i]["text"], self.max_len)


class SFTDataset(_JsonlDataset):
    """`{"conversations": [{"role", "content"}, ...]}` jsonl -> {"input_ids", "labels"} (assistant turns only)."""
    check = staticmethod(check_sft)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return encode_conversation(self.tokenizer, self.file[i]["conversations"], self.max_len)


class DPODataset(_JsonlDataset):
    """`{"chosen": [msgs], "rejected": [msgs]}` jsonl -> chosen_/rejected_ input_ids and labels."""
    check = staticmethod(check_dpo)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rec = self.file[i]
        out = {}
        for side in ("chosen", "rejected"):
            enc = encode_conversation(self.tokenizer, rec[side], self.max_len)
            out[f"{side}_input_ids"], out[f"{side}_labels"] = enc["input_ids"], enc["labels"]
        return out
