"""Vision-language training data: minimind-v jsonl / parquet and LLaVA json -> token ids + images.

Sources (one class each, all yielding `VLMRecord(messages, images, where)`):
- minimind-v jsonl: `{"conversations": [{"role", "content"}...], "image": "a.jpg"}`; several images
  as `"a.jpg, b.jpg"` or a list; paths relative to an image folder (`--images`);
- minimind-v parquet: `conversations` (a JSON string) + `image_bytes` (bytes, or a list of bytes).
  minimind-v gives text-only rows a dummy 8x8 image and no `<image>` marker: such a lone image is
  dropped, a text-only sample needs none here;
- LLaVA json: `[{"image": ..., "conversations": [{"from": "human"|"gpt", "value": ...}]}]`.

`VLMDataset` renders each conversation with the chat template, expands every `<image>` to N
placeholder ids, and supervises assistant tokens only (`data.datasets.encode_conversation`: the
same mask as text SFT; placeholder positions are never targets). A sample longer than `max_len`
is cut at an image boundary, never through an image, and keeps only the images still inside.
Images come either as `pixel_values` (decoded + preprocessed per step) or, with a
`vlm.feature_cache.FeatureCache`, as cached fp16 `image_features` (encoded once, up front).

`group_by_image` merges single-question rows about one image into multi-turn conversations (more
supervised answers per image forward pass; `training.sft_vlm --turns-per-image`).

Bad records (invalid turns, marker/image count mismatch, missing or undecodable images) are
skipped with a warning naming file:line; they never stop the rest.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from data.collate import pad_collate
from data.datasets import IGNORE_INDEX, check_messages, encode_conversation
from data.jsonl import DataError, JsonlFile
from vlm.images import ImageError, ImageSource, load_image
from vlm.processor import count_markers, expand_image_markers
from vlm.tokenizer import IMAGE_ID, IMAGE_MARKER

log = logging.getLogger(__name__)

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
           "system": "system", "tool": "tool"}
NO_TRUNCATION = 1 << 30


@dataclass
class VLMRecord:
    messages: list[dict]  # {"role", "content"}; content holds the <image> markers
    images: list[ImageSource]  # resolved paths or encoded image bytes, in marker order
    where: str  # "file:line" / "file:row N" for messages


def normalise_messages(turns) -> list[dict]:
    """minimind `{"role", "content"}` or LLaVA `{"from", "value"}` turns -> `{"role", "content"}`."""
    if not isinstance(turns, list):
        raise ValueError("field 'conversations' must be a list of turns")
    out = []
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            raise ValueError(f"conversations[{k}] must be an object")
        role = t.get("role", t.get("from"))
        if role not in ROLE_OF:
            raise ValueError(f"conversations[{k}]: unknown role {role!r}")
        out.append({"role": ROLE_OF[role], "content": t.get("content", t.get("value"))})
    return out


def image_names(value) -> list[str]:
    """The `image` field: None, "a.jpg", "a.jpg, b.jpg" or ["a.jpg", "b.jpg"] -> names."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return value
    raise ValueError(f"field 'image' must be a path, comma-separated paths or a list, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------- sources
class MiniMindVJsonl:
    """minimind-v jsonl records (read lazily from disk, `data.jsonl.JsonlFile`)."""

    def __init__(self, path: str | Path, image_root: str | Path):
        self.file, self.image_root = JsonlFile(path), Path(image_root)

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, i: int) -> VLMRecord:
        rec = self.file[i]
        where = self.file.where(i)
        try:
            if "conversations" not in rec:
                raise ValueError("missing field 'conversations'")
            return VLMRecord(normalise_messages(rec["conversations"]),
                             [self.image_root / p for p in image_names(rec.get("image"))], where)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None


class MiniMindVParquet:
    """minimind-v parquet: `conversations` JSON string + `image_bytes` (memory-mapped Arrow table)."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.table = pq.read_table(self.path, memory_map=True)
        for col in ("conversations", "image_bytes"):
            if col not in self.table.column_names:
                raise DataError(f"{self.path}: no column {col!r} (columns: {self.table.column_names})")

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> VLMRecord:
        where = f"{self.path}:row {i}"
        try:
            conv = self.table.column("conversations")[i].as_py()
            messages = normalise_messages(json.loads(conv) if isinstance(conv, str) else conv)
            raw = self.table.column("image_bytes")[i].as_py()
            images = [] if raw is None else [raw] if isinstance(raw, (bytes, bytearray)) else list(raw)
            if len(images) == 1 and not any(IMAGE_MARKER in (m["content"] or "") for m in messages):
                images = []  # minimind-v's placeholder image on a text-only row
            return VLMRecord(messages, images, where)
        except (ValueError, TypeError) as e:
            raise DataError(f"{where}: {e}") from None


class LlavaJson:
    """LLaVA's instruction json: one list of `{"image", "conversations": [{"from", "value"}]}`."""

    def __init__(self, path: str | Path, image_root: str | Path):
        self.path, self.image_root = Path(path), Path(image_root)
        try:
            self.rows = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}:{e.lineno}: bad JSON: {e.msg}") from None
        if not isinstance(self.rows, list):
            raise DataError(f"{self.path}: expected a JSON list of samples")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> VLMRecord:
        where = f"{self.path}:[{i}]"
        row = self.rows[i]
        try:
            if not isinstance(row, dict) or "conversations" not in row:
                raise ValueError("sample must be an object with 'conversations'")
            return VLMRecord(normalise_messages(row["conversations"]),
                             [self.image_root / p for p in image_names(row.get("image"))], where)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None


def open_source(path: str | Path, image_root: str | Path | None = None):
    """The reader for `path` by extension: .jsonl (minimind-v), .parquet (minimind-v), .json (LLaVA)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    root = Path(image_root) if image_root else (path.parent / "images" if (path.parent / "images").is_dir() else path.parent)
    if path.suffix == ".jsonl":
        return MiniMindVJsonl(path, root)
    if path.suffix == ".parquet":
        return MiniMindVParquet(path)
    if path.suffix == ".json":
        return LlavaJson(path, root)
    raise ValueError(f"{path}: unknown format (expected .jsonl, .parquet or .json)")


# ------------------------------------------------------------------------------------------ grouping
def _one_question(row: dict) -> bool:
    """A row `group_by_image` can merge: one image, one user question carrying its marker, one answer."""
    turns = row.get("conversations")
    return (isinstance(row.get("image"), str) and len(image_names(row["image"])) == 1
            and isinstance(turns, list) and len(turns) == 2
            and [t.get("role") for t in turns] == ["user", "assistant"]
            and count_markers(turns[0].get("content") or "") == 1)


def group_by_image(rows: list[dict], turns: int, seed: int = 0) -> list[dict]:
    """Single-question rows -> multi-turn conversations of up to `turns` questions about one image.

    A single-question sample supervises only its 1-2 answer tokens behind 64 image tokens; asking
    several of an image's questions in one conversation supervises several answers per forward
    pass. The first user turn keeps the `<image>` marker, later turns only ask. An image's
    questions are shuffled (seeded by `seed` and the image name, so any question type may come
    first, as in the single-question evaluation), then each joins the first conversation that
    has room and cannot give its answer away: none of its `type` yet (the en/zh twin of a
    question has the same answer) and its answer in no earlier turn ("What colour is the star?"
    names the shape; so questions whose answer other questions name are placed first).
    Otherwise the model learns to copy answers from the context instead of reading the image.
    Other rows (several images, several turns, no marker) pass through unchanged; conversations
    keep the order in which their images first appear.
    """
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    by_image: dict[str, list[dict]] = {}
    order: list[tuple[str, object]] = []  # ("image", name) or ("row", row), in file order
    for row in rows:
        if not _one_question(row):
            order.append(("row", row))
            continue
        name = row["image"].strip()
        if name not in by_image:
            by_image[name] = []
            order.append(("image", name))
        by_image[name].append(row)
    out = []
    for kind, item in order:
        if kind == "row":
            out.append(item)
            continue
        questions = list(by_image[item])
        random.Random(f"{seed}:{item}").shuffle(questions)
        # questions whose answer other questions name go first, while nothing before them names it
        questions.sort(key=lambda q: -sum(q["conversations"][1]["content"].strip() in o["conversations"][0]["content"]
                                          for o in questions if o is not q))
        groups: list[list[dict]] = []
        for q in questions:
            home = next((g for g in groups if len(g) < turns and not _gives_away(g, q)), None)
            if home is None:
                groups.append([q])
            else:
                home.append(q)
        out.extend(_merge(g) for g in groups)
    return out


def _gives_away(group: list[dict], row: dict) -> bool:
    """Whether the turns of `group` would let `row`'s answer be read off the context."""
    answer = row["conversations"][1]["content"].strip()
    kind = row.get("type")
    earlier = " ".join(t["content"] for r in group for t in r["conversations"])
    return (kind is not None and any(r.get("type") == kind for r in group)) or answer in earlier


def _merge(rows: list[dict]) -> dict:
    conversation = []
    for k, row in enumerate(rows):
        question, answer = row["conversations"]
        content = question["content"] if k == 0 else question["content"].replace(IMAGE_MARKER, "").strip()
        conversation += [{"role": "user", "content": content}, {"role": "assistant", "content": answer["content"]}]
    return {"conversations": conversation, "image": rows[0]["image"],
            "types": [r.get("type") for r in rows], "langs": [r.get("lang") for r in rows]}


# ------------------------------------------------------------------------------------------ encoding
def encode_vlm_conversation(tokenizer, messages: list[dict], num_image_tokens: int,
                            max_len: int) -> tuple[dict[str, torch.Tensor], range]:
    """Token ids + assistant-only labels with N placeholder ids per `<image>`; and which images remain.

    Over-long samples keep the first `max_len` tokens (or, when that holds no target, the window
    ending at the last target, as `encode_conversation` does), moved inward so that no image's
    run of placeholders is cut. Returns the encoding and the range of image indices inside it.
    """
    expanded = [{**m, "content": expand_image_markers(m["content"], num_image_tokens)} for m in messages]
    enc = encode_conversation(tokenizer, expanded, NO_TRUNCATION)
    ids, labels = enc["input_ids"], enc["labels"]
    slots = ids == IMAGE_ID
    labels[slots] = IGNORE_INDEX
    n_images = int(slots.sum()) // num_image_tokens
    if len(ids) <= max_len:
        return {"input_ids": ids, "labels": labels}, range(n_images)
    lo, hi = 0, max_len
    targets = (labels != IGNORE_INDEX).nonzero().flatten()
    if len(targets) and int(targets[0]) >= max_len:
        hi = int(targets[-1]) + 1
        lo = hi - max_len
    before = torch.cat([torch.zeros(1, dtype=torch.long), slots.long().cumsum(0)])  # slots before position p
    if lo > 0 and slots[lo] and before[lo] % num_image_tokens:  # inside an image: skip to its end
        lo += num_image_tokens - int(before[lo] % num_image_tokens)
    if hi < len(ids) and slots[hi - 1] and before[hi] % num_image_tokens:  # cut inside: drop that image
        hi -= int(before[hi] % num_image_tokens)
    first = -(-int(before[lo]) // num_image_tokens)
    last = int(before[hi]) // num_image_tokens
    return {"input_ids": ids[lo:hi], "labels": labels[lo:hi]}, range(first, last)


# ------------------------------------------------------------------------------------------- dataset
class VLMDataset(Dataset):
    """Conversations with images -> {"input_ids", "labels", "pixel_values" | "image_features"}.

    Give `preprocess` (the encoder's image transform: images decoded every step) or `feature_cache`
    (features encoded once up front, then read from disk).
    """

    def __init__(self, source, tokenizer, num_image_tokens: int, max_len: int,
                 preprocess: Callable | None = None, feature_cache=None, max_reported: int = 5):
        if (preprocess is None) == (feature_cache is None):
            raise ValueError("give exactly one of preprocess (encode every step) or feature_cache")
        if max_len < num_image_tokens + 8:
            raise ValueError(f"max_len {max_len} cannot hold an image ({num_image_tokens} tokens) and its text")
        self.source, self.tokenizer = source, tokenizer
        self.num_image_tokens, self.max_len = num_image_tokens, max_len
        self.preprocess, self.cache = preprocess, feature_cache
        self.index: list[int] = []  # usable source records
        self.keys: list[list[str]] = []  # per usable record: cache keys of its images
        self.skipped: list[str] = []
        self._max_reported = max_reported
        self._scan()
        if not self.index:
            raise DataError(f"{getattr(source, 'path', getattr(getattr(source, 'file', None), 'path', source))}: "
                            f"no usable records ({len(self.skipped)} skipped)")

    def _skip(self, reason: str) -> None:
        self.skipped.append(reason)
        if len(self.skipped) <= self._max_reported:
            log.warning("skipped: %s", reason)

    def _scan(self, chunk: int = 1024) -> None:
        """Validate every record once; with a cache, encode the images not cached yet."""
        pending: list[tuple[int, VLMRecord]] = []
        for i in range(len(self.source)):
            try:
                rec = self.source[i]
                check_messages(rec.messages)
                n = sum(count_markers(m["content"]) for m in rec.messages)
                if n != len(rec.images):
                    raise DataError(f"{rec.where}: {n} {IMAGE_MARKER} marker(s) but {len(rec.images)} image(s)")
                for img in rec.images:
                    if isinstance(img, Path) and not img.is_file():
                        raise DataError(f"{rec.where}: image {img} not found")
            except DataError as e:
                self._skip(str(e))
                continue
            except (ValueError, TypeError) as e:  # check_messages: the turns themselves are wrong
                self._skip(f"{rec.where}: {e}")
                continue
            pending.append((i, rec))
            if len(pending) >= chunk:
                self._accept(pending)
                pending = []
        self._accept(pending)
        if self.skipped:
            log.warning("%d record(s) skipped, %d kept", len(self.skipped), len(self.index))

    def _accept(self, records: list[tuple[int, VLMRecord]]) -> None:
        if self.cache is None:
            for i, rec in records:
                self.index.append(i)
                self.keys.append([])
            return
        flat = [img for _, rec in records for img in rec.images]
        names = [f"{rec.where} image {j}" for _, rec in records for j in range(len(rec.images))]
        keys = self.cache.ensure(flat, names=names)
        pos = 0
        for i, rec in records:
            mine = keys[pos:pos + len(rec.images)]
            pos += len(rec.images)
            if any(k is None for k in mine):
                self._skip(f"{rec.where}: an image could not be read (see the warning above)")
                continue
            self.index.append(i)
            self.keys.append(mine)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        rec = self.source[self.index[k]]
        item, kept = encode_vlm_conversation(self.tokenizer, rec.messages, self.num_image_tokens, self.max_len)
        if self.cache is not None:
            item["image_features"] = self.cache.get(self.keys[k][kept.start:kept.stop])
        elif len(kept):
            try:
                item["pixel_values"] = torch.stack([self.preprocess(load_image(rec.images[j], name=f"{rec.where} image {j}"))
                                                    for j in kept])
            except ImageError as e:
                raise DataError(str(e)) from e
        return item


def vlm_collate(items: list[dict], pad_id: int = 0) -> dict:
    """Right-padded `input_ids`/`labels`/`attention_mask`, and all images of the batch concatenated
    (flat, sample by sample: the order of the placeholders). A batch without images has no image key."""
    batch = pad_collate([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items], pad_id)
    for key in ("pixel_values", "image_features"):
        parts = [it[key] for it in items if it.get(key) is not None and len(it[key])]
        if parts:
            batch[key] = torch.cat(parts)
    return batch
