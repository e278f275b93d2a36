"""Batch building: right-padding to the longest item (`pad_collate`) or packing documents (`pack_collate`).

Padding never decides what is learned: padded label positions are always -100 and the attention
mask marks real tokens, whatever the pad id is (it may equal the end-of-turn id).
"""
from __future__ import annotations

import torch

from data.datasets import IGNORE_INDEX


def _pad_value(key: str, pad_id: int) -> int:
    if key.endswith("labels"):
        return IGNORE_INDEX
    if key.endswith("input_ids"):
        return pad_id
    return 0


def pad_collate(items: list[dict], pad_id: int = 0) -> dict:
    """Stack a list of dataset items into right-padded tensors.

    Every 1-D tensor key is padded to the batch maximum (`*input_ids` with pad_id, `*labels` with -100,
    anything else with 0) and each `X_input_ids` gets an `X_attention_mask` (1 = real token), so the DPO
    keys `chosen_input_ids`/`rejected_input_ids` work as well as plain `input_ids`. Scalars and
    same-shape tensors are stacked; non-tensor values are returned as lists.
    """
    if not items:
        raise ValueError("pad_collate: empty batch")
    batch: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if not all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = values
        elif all(v.dim() == 1 for v in values):
            width = max(len(v) for v in values)
            out = torch.full((len(values), width), _pad_value(key, pad_id), dtype=values[0].dtype)
            for r, v in enumerate(values):
                out[r, :len(v)] = v
            batch[key] = out
            if key.endswith("input_ids"):
                mask = torch.zeros(len(values), width, dtype=torch.long)
                for r, v in enumerate(values):
                    mask[r, :len(v)] = 1
                batch[key[: -len("input_ids")] + "attention_mask"] = mask
        else:
            batch[key] = torch.stack(values)
    return batch


def pack_collate(items: list[dict], max_len: int, pad_id: int = 0, row_len: int | None = None) -> dict:
    """Batches without padding waste: whole documents packed side by side into rows of `max_len`.

    Documents are placed first-fit in order (none is split; longer ones must have been truncated to
    `max_len`). Each row gets `position_ids` that restart at 0 where a document starts: the model
    reads those restarts as borders and lets a token attend only within its own document, so a packed
    batch trains exactly what the padded one would (the Hugging Face "padding-free" convention of
    `DataCollatorWithFlattening`). The first label of each document is dropped: it would be predicted
    from the end of another document. Only row ends are padded.

    `row_len` narrows the rows (widened to the batch's longest document when needed): attention in a
    packed row costs its full width squared whatever the borders, so short documents train faster
    in short rows.
    """
    if not items:
        raise ValueError("pack_collate: empty batch")
    longest = max(len(it["input_ids"]) for it in items)
    if longest > max_len:
        raise ValueError(f"pack_collate: an item of {longest} tokens does not fit max_len {max_len}")
    width = max(row_len or max_len, longest)
    rows: list[list[dict]] = []
    room: list[int] = []
    for it in items:
        n = len(it["input_ids"])
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(it)
        room[r] -= n
    width = max(width - free for free in room)
    out_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    out_lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for it in row:
            n = len(it["input_ids"])
            out_ids[r, at:at + n] = it["input_ids"]
            out_lab[r, at + 1:at + n] = it.get("labels", it["input_ids"])[1:]
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
    return {"input_ids": out_ids, "labels": out_lab, "attention_mask": mask, "position_ids": positions}
