"""Dense vectors in FAISS, keyed by our chunk ids; saved with `faiss.write_index` (no pickle).

Default: `IndexIDMap2(IndexFlatIP)` on L2-normalised vectors: exact cosine search, and `remove_ids`
works, so deleting a file's chunks is exact. Past `hnsw_threshold` vectors the flat scan gets slow,
and the index is rebuilt as HNSW (M=32): approximate, much faster. HNSW cannot remove vectors, so
deletions become tombstones filtered out of results (over-fetching to keep k), and the graph is
rebuilt from the stored vectors when tombstones pass 20%.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np


class DenseIndex:
    def __init__(self, dim: int, hnsw_threshold: int = 200_000, hnsw_m: int = 32, ef_search: int = 128):
        self.dim, self.hnsw_threshold, self.hnsw_m, self.ef_search = dim, hnsw_threshold, hnsw_m, ef_search
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.tombstones: set[int] = set()

    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(faiss.downcast_index(self.index.index), faiss.IndexHNSWFlat) else "flat"

    def __len__(self) -> int:
        return self.index.ntotal - len(self.tombstones)

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.shape != (len(ids), self.dim):
            raise ValueError(f"vectors of shape {vectors.shape}, expected ({len(ids)}, {self.dim})")
        self.index.add_with_ids(vectors, np.asarray(ids, np.int64))
        if self.kind == "flat" and self.index.ntotal >= self.hnsw_threshold:
            self._rebuild("hnsw")

    def remove(self, ids: Sequence[int]) -> None:
        if len(ids) == 0:
            return
        if self.kind == "flat":
            self.index.remove_ids(np.asarray(ids, np.int64))
            return
        present = set(faiss.vector_to_array(self.index.id_map).tolist())
        self.tombstones |= set(int(i) for i in ids) & present
        if len(self.tombstones) > 0.2 * self.index.ntotal:
            self._rebuild("hnsw" if len(self) >= self.hnsw_threshold else "flat")

    def _rebuild(self, kind: str) -> None:
        all_ids = faiss.vector_to_array(self.index.id_map)
        keep = np.array([i not in self.tombstones for i in all_ids.tolist()], bool)
        vecs = self.index.index.reconstruct_n(0, self.index.ntotal)[keep] if len(all_ids) else np.zeros((0, self.dim), np.float32)
        if kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = 80
        else:
            inner = faiss.IndexFlatIP(self.dim)
        self.index = faiss.IndexIDMap2(inner)
        self.tombstones = set()
        if keep.any():
            self.index.add_with_ids(np.ascontiguousarray(vecs), all_ids[keep])

    def search(self, query: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine scores) of the k nearest vectors to one query vector."""
        if self.index.ntotal == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = np.ascontiguousarray(query, np.float32).reshape(1, -1)
        if self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = max(self.ef_search, k + len(self.tombstones))
        fetch = min(self.index.ntotal, k + len(self.tombstones))
        scores, ids = self.index.search(q, fetch)
        pairs = [(i, s) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in self.tombstones][:k]
        return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.float32)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of these ids (for MMR)."""
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "dense.faiss"))
        meta = {"dim": self.dim, "hnsw_threshold": self.hnsw_threshold, "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search, "tombstones": sorted(self.tombstones)}
        (folder / "dense.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "DenseIndex":
        meta = json.loads((folder / "dense.json").read_text(encoding="utf-8"))
        self = cls(meta["dim"], meta["hnsw_threshold"], meta["hnsw_m"], meta["ef_search"])
        self.index = faiss.read_index(str(folder / "dense.faiss"))
        self.tombstones = set(meta["tombstones"])
        return self
