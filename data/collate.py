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


def pack_collate(items: list[dict], max_len: int, pad_id: int = 0) -> dict:
    """Pretraining batches without padding waste: concatenate the items and cut rows of max_len.

    Documents keep their `<|im_start|>`/`<|im_end|>` borders, so the model sees where one ends; as in
    GPT-style pretraining, a row may hold parts of several documents that attend to each other. Only
    the last row can be padded. The number of rows varies with the items' lengths; the number of
    supervised tokens does not change.
    """
    if not items:
        raise ValueError("pack_collate: empty batch")
    ids = torch.cat([it["input_ids"] for it in items])
    labels = torch.cat([it.get("labels", it["input_ids"]) for it in items])
    rows = -(-len(ids) // max_len)
    width = max_len if rows > 1 else len(ids)
    out_ids = torch.full((rows * width,), pad_id, dtype=torch.long)
    out_lab = torch.full((rows * width,), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(rows * width, dtype=torch.long)
    out_ids[: len(ids)], out_lab[: len(ids)], mask[: len(ids)] = ids, labels, 1
    return {"input_ids": out_ids.view(rows, width), "labels": out_lab.view(rows, width),
            "attention_mask": mask.view(rows, width)}
