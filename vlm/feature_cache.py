"""On-disk cache of the frozen encoder's patch features, so VLM training never re-encodes an image.

The encoder is frozen, so an image's patch tokens `[N, D]` are a pure function of (image bytes,
encoder weights, preprocessing). They are computed once, stored in fp16 and memory-mapped: every
epoch and every later stage (pretrain -> SFT) reads them back for the cost of a page-cache copy.

Layout: `ROOT/<encoder identity>/` holds `meta.json` (identity, N, D), shards `shard-*.npy` (plain
`.npy` fp16 arrays `[rows, N, D]`, opened with `np.load(mmap_mode="r")`, no pickle) and
`index.tsv` (`sha256-of-image-bytes <TAB> shard <TAB> row`). The encoder identity
(`VisionEncoder.identity`: name + hash of its weights and preprocessing) names the folder, so a
changed encoder looks in another folder and can never read stale features.

Writes are append-only and crash-safe: a shard is written under a temporary name and renamed, and
only then are its index lines appended (one `write` per batch on an O_APPEND file: concurrent
writers, e.g. DDP ranks, can interleave but never tear lines; a key written twice is harmless).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .images import ImageError, ImageSource, load_image

log = logging.getLogger(__name__)

INDEX = "index.tsv"
META = "meta.json"


def image_key(src: ImageSource) -> str:
    """sha256 of the image's bytes (file content; raw pixels + mode + size for a PIL image)."""
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif isinstance(src, Image.Image):
        data = f"{src.mode}:{src.size}:".encode() + src.tobytes()
    else:
        try:
            data = Path(src).read_bytes()
        except OSError as e:
            raise ImageError(f"{src}: cannot read ({e.strerror or e})") from e
    return hashlib.sha256(data).hexdigest()


def _folder_name(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identity)


class FeatureCache:
    """Patch features of one encoder, keyed by image content hash (see the module docstring)."""

    def __init__(self, root: str | Path, encoder=None, identity: str | None = None,
                 num_patches: int | None = None, hidden_size: int | None = None):
        if encoder is not None:
            identity, num_patches, hidden_size = encoder.identity, encoder.num_patches, encoder.hidden_size
        if identity is None or num_patches is None or hidden_size is None:
            raise ValueError("FeatureCache needs an encoder, or identity + num_patches + hidden_size")
        self.encoder = encoder
        self.identity, self.num_patches, self.hidden_size = identity, int(num_patches), int(hidden_size)
        self.dir = Path(root) / _folder_name(identity)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"identity": identity, "num_patches": self.num_patches, "hidden_size": self.hidden_size,
                "dtype": "float16"}
        meta_file = self.dir / META
        if meta_file.is_file():
            saved = json.loads(meta_file.read_text(encoding="utf-8"))
            if saved != meta:
                raise ValueError(f"{meta_file}: cache was written for {saved}, not {meta}")
        else:
            tmp = meta_file.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, meta_file)
        self._where: dict[str, tuple[str, int]] = {}
        # path -> key while the file's (mtime, size) hold: a VLM SFT set asks 4-8 questions about each
        # picture, so its scan read and hashed every file several times (tiny: 265k reads of 70k files)
        self._file_keys: dict[str, tuple[tuple[int, int], str]] = {}
        self._index_pos = 0
        self._shards: dict[str, np.ndarray] = {}
        self.refresh()

    # -- index --------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read index lines appended since the last look (by this or another process)."""
        index = self.dir / INDEX
        if not index.is_file():
            return
        with open(index, "rb") as fh:
            fh.seek(self._index_pos)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written by someone else is left for later
        for line in data[:end].decode("utf-8").splitlines():
            key, shard, row = line.split("\t")
            self._where[key] = (shard, int(row))
        self._index_pos += end

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    # -- read ---------------------------------------------------------------------------------------
    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            self._shards[name] = np.load(self.dir / name, mmap_mode="r", allow_pickle=False)
        return self._shards[name]

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """fp16 features `[len(keys), N, D]` (copied out of the memory map); KeyError for a miss."""
        out = np.empty((len(keys), self.num_patches, self.hidden_size), dtype=np.float16)
        for i, key in enumerate(keys):
            try:
                shard, row = self._where[key]
            except KeyError:
                raise KeyError(f"image {key[:12]}... is not in the feature cache {self.dir}") from None
            out[i] = self._shard(shard)[row]
        return torch.from_numpy(out)

    def __getstate__(self) -> dict:  # data-loader workers reopen the memory maps themselves
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state

    # -- write --------------------------------------------------------------------------------------
    def _key(self, src: ImageSource) -> str:
        """`image_key(src)`, hashing a file again only when its modification time or size changed."""
        if isinstance(src, (bytes, bytearray, Image.Image)):
            return image_key(src)
        path = os.fspath(src)
        try:
            st = os.stat(path)
        except OSError as e:
            raise ImageError(f"{src}: cannot read ({e.strerror or e})") from e
        stamp = (st.st_mtime_ns, st.st_size)
        known = self._file_keys.get(path)
        if known is None or known[0] != stamp:
            known = self._file_keys[path] = (stamp, image_key(src))
        return known[1]

    def ensure(self, images: Sequence[ImageSource], batch_size: int = 32, shard_rows: int = 4096,
               names: Sequence[str] | None = None) -> list[str | None]:
        """Key of every image, encoding (and storing) those not cached yet.

        An image that cannot be read or decoded gets `None` and a warning naming it (`names[i]`, e.g.
        "file.parquet:row 17", or the path); the others are still cached. Needs the encoder the
        cache was opened with.
        """
        keys: list[str | None] = []
        todo: dict[str, tuple[ImageSource, str | None]] = {}
        for i, src in enumerate(images):
            name = names[i] if names is not None else None
            try:
                key = self._key(src)
            except ImageError as e:
                log.warning("feature cache: %s", f"{name}: {e}" if name else e)
                keys.append(None)
                continue
            keys.append(key)
            if key not in self._where and key not in todo:
                todo[key] = (src, name)
        if todo:
            if self.encoder is None:
                raise ValueError(f"{len(todo)} image(s) are not in the cache and no encoder was given to encode them")
            failed = self._encode_and_store(list(todo.items()), batch_size, shard_rows)
            keys = [None if k in failed else k for k in keys]
        return keys

    def _encode_and_store(self, items: list[tuple[str, tuple[ImageSource, str | None]]], batch_size: int,
                          shard_rows: int) -> set[str]:
        failed: set[str] = set()
        for start in range(0, len(items), shard_rows):
            chunk = items[start:start + shard_rows]
            shard = f"shard-{uuid.uuid4().hex[:16]}.npy"
            tmp = self.dir / f"{shard}.tmp"
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                            shape=(len(chunk), self.num_patches, self.hidden_size))
            lines, row = [], 0
            for b in range(0, len(chunk), batch_size):
                pixels, batch_keys = [], []
                for key, (src, name) in chunk[b:b + batch_size]:
                    try:
                        pixels.append(self.encoder.preprocess(load_image(src, name=name)))
                        batch_keys.append(key)
                    except ImageError as e:
                        log.warning("feature cache: %s", e)
                        failed.add(key)
                if not pixels:
                    continue
                feats = self.encoder(torch.stack(pixels)).float().cpu().numpy().astype(np.float16)
                arr[row:row + len(feats)] = feats
                lines += [f"{k}\t{shard}\t{row + j}\n" for j, k in enumerate(batch_keys)]
                row += len(feats)
            arr.flush()
            del arr
            if not lines:
                tmp.unlink(missing_ok=True)
                continue
            os.replace(tmp, self.dir / shard)
            with open(self.dir / INDEX, "ab") as fh:
                fh.write("".join(lines).encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
            self.refresh()
        return failed
