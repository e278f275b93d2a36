"""`rag.Index`: a persistent, incremental hybrid index of a document folder.

On disk (no pickle anywhere):

    PATH/CURRENT               name of the live version, e.g. "v000004" (swapped with os.replace)
    PATH/v000004/manifest.json format version, embedder spec, chunker and BM25 settings, files + hashes
    PATH/v000004/chunks.jsonl  one chunk per line: id, text, path, page, heading, span, kind
    PATH/v000004/bm25/         BM25 arrays (.npy) + vocabulary (.json)
    PATH/v000004/dense/        dense.faiss (faiss.write_index) + dense.json
    PATH/v000004/embedder/     the fitted offline embedder (.npy), when there is one

Atomicity: `commit()` writes a complete new version into a temporary folder, fsyncs it, renames it to
`vNNNNNN` and only then swaps `CURRENT` (os.replace: atomic). A run killed at any point (even -9)
leaves CURRENT naming the previous, complete version; stale temporary folders are removed by the next
commit. Incremental: each file's sha256 is kept, so re-indexing loads, chunks and embeds only new and
changed files and drops the chunks of changed and deleted ones.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .bm25 import BM25
from .chunking import Chunk, Chunker, ChunkerConfig
from .dense import DenseIndex
from .embedders import Embedder, HashedNgramLSA, embedder_from_spec
from .fusion import fuse
from .ingest import IngestConfig, LoadError, Skipped, load, read_bytes, walk
from .tokenize import TOKENIZER_ID, tokenize

FORMAT_VERSION = 1


@dataclass
class Hit:
    chunk: Chunk
    score: float
    scores: dict[str, float] = field(default_factory=dict)  # per retriever / stage


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


class Index:
    def __init__(self, path: str | Path, embedder: Embedder | None = None, chunker: ChunkerConfig | None = None,
                 k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25, ingest: IngestConfig | None = None):
        """A new, empty index that will live at `path` (nothing is written before `commit`)."""
        self.path = Path(path)
        self.embedder = embedder or HashedNgramLSA()
        self.chunker = Chunker(chunker)
        self.ingest = ingest or IngestConfig()
        self.bm25 = BM25(k1, b, epsilon)
        self.dense = DenseIndex(self.embedder.dim)
        self.chunks: dict[int, Chunk] = {}
        self.files: dict[str, dict] = {}  # rel path -> {"sha256", "size", "chunk_ids"}
        self.skipped: list[dict] = []
        self.warnings: list[dict] = []
        self.next_id = 0
        self.version = 0
        self.root: str | None = None

    # ---- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, embedder: Embedder | None = None) -> "Index":
        """Load the live version at `path`; the embedder is rebuilt from the manifest unless given."""
        path = Path(path)
        current = path / "CURRENT"
        if not current.is_file():
            raise FileNotFoundError(f"{path}: not an index (no CURRENT file); build one with `python -m rag index`")
        vdir = path / current.read_text(encoding="utf-8").strip()
        m = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
        if m.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{vdir / 'manifest.json'}: format_version {m.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}; re-index with --rebuild")
        if m.get("tokenizer") != TOKENIZER_ID:
            raise ValueError(f"{vdir / 'manifest.json'}: built with tokenizer {m.get('tokenizer')!r}; re-index with --rebuild")
        spec = m["embedder"]
        if embedder is None:
            embedder = embedder_from_spec(spec)
        elif {k: v for k, v in embedder.spec().items() if k != "fit_id"} != {k: v for k, v in spec.items() if k != "fit_id"}:
            raise ValueError(f"{path}: index was built with embedder {spec}, not {embedder.spec()}; re-index with --rebuild")
        if embedder.needs_fit:
            embedder.load(vdir / "embedder")
        self = cls(path, embedder, ChunkerConfig(**m["chunker"]), **m["bm25"])
        self.bm25 = BM25.load(vdir / "bm25")
        self.dense = DenseIndex.load(vdir / "dense")
        with open(vdir / "chunks.jsonl", encoding="utf-8") as f:
            for line in f:
                c = Chunk(**json.loads(line))
                self.chunks[c.id] = c
        self.files, self.skipped, self.warnings = m["files"], m["skipped"], m.get("warnings", [])
        self.next_id, self.version, self.root = m["next_id"], m["version"], m.get("root")
        return self

    @classmethod
    def open_or_create(cls, path: str | Path, embedder: Embedder | None = None, **kw) -> "Index":
        return cls.open(path, embedder) if (Path(path) / "CURRENT").is_file() else cls(path, embedder, **kw)

    # ---- changing ----------------------------------------------------------------------------------
    def remove_source(self, key: str) -> int:
        """Drop every chunk of one source (file); returns how many chunks went."""
        entry = self.files.pop(key, None)
        if not entry:
            return 0
        ids = entry["chunk_ids"]
        self.bm25.delete(ids)
        self.dense.remove(ids)
        for i in ids:
            self.chunks.pop(i, None)
        return len(ids)

    def add_sources(self, sources: Sequence[tuple[str, str, list[Chunk], list[bytes | None]]],
                    progress: bool = False, batch_size: int = 256) -> int:
        """Add (key, sha256, chunks, image bytes per chunk) sources, replacing older versions; embeds all.

        Returns the number of chunks embedded. The offline embedder is fitted here on first use.
        """
        for key, *_ in sources:
            self.remove_source(key)
        new: list[Chunk] = []
        images: list[bytes | None] = []
        for key, sha, chunks, imgs in sources:
            ids = list(range(self.next_id, self.next_id + len(chunks)))
            self.next_id += len(chunks)
            for c, i in zip(chunks, ids):
                c.id = i
            self.files[key] = {"sha256": sha, "chunk_ids": ids}
            new.extend(chunks)
            images.extend(imgs)
        if not new:
            return 0
        if self.embedder.needs_fit and getattr(self.embedder, "components", None) is None:
            self.embedder.fit([c.text for c in new])
        vecs = np.zeros((len(new), self.embedder.dim), np.float32)
        text_rows = [i for i, im in enumerate(images) if im is None or not self.embedder.supports_images]
        for s in _progress(range(0, len(text_rows), batch_size), progress, desc="embedding",
                           unit="batch", total=(len(text_rows) + batch_size - 1) // batch_size):
            rows = text_rows[s:s + batch_size]
            vecs[rows] = self.embedder.embed_documents([new[i].text for i in rows])
        image_rows = [i for i, im in enumerate(images) if im is not None and self.embedder.supports_images]
        if image_rows:
            vecs[image_rows] = self.embedder.embed_images([images[i] for i in image_rows])
        ids = [c.id for c in new]
        self.bm25.add(ids, (tokenize(c.text) for c in new))
        self.dense.add(ids, vecs)
        self.chunks.update((c.id, c) for c in new)
        return len(new)

    def index_folder(self, root: str | Path, progress: bool = True, rebuild: bool = False) -> dict:
        """Bring the index in line with `root` and commit. Returns a report (counts, skipped files)."""
        root = Path(root)
        if not root.is_dir():
            raise NotADirectoryError(f"{root}: not a folder")
        t0 = time.perf_counter()
        with self._lock():
            if rebuild:
                self.__init__(self.path, _refit(self.embedder), self.chunker.config, self.bm25.k1, self.bm25.b,
                              self.bm25.epsilon, self.ingest)
            self.root = str(root.resolve())
            entries, skipped = walk(root, self.ingest)
            warnings: list[dict] = []
            todo, unchanged, seen = [], 0, set()
            for e in _progress(entries, progress, desc="reading", unit="file"):
                try:
                    data = read_bytes(e.path, self.ingest.max_file_bytes)
                    sha = hashlib.sha256(data).hexdigest()
                    seen.add(e.rel)
                    if self.files.get(e.rel, {}).get("sha256") == sha:
                        unchanged += 1
                        continue
                    pages, notes = load(e.rel, data, self.ingest)
                    chunks, imgs = self._chunk(e.rel, pages)
                    if not chunks:
                        raise LoadError("nothing to index (no text; images need OCR text, a caption or an image embedder)")
                    todo.append((e.rel, sha, chunks, imgs))
                    warnings += [{"path": e.rel, "warning": n} for n in notes]
                except LoadError as err:
                    skipped.append(Skipped(e.rel, str(err)))
                    seen.discard(e.rel)
                except Exception as err:  # one bad file never stops the rest
                    skipped.append(Skipped(e.rel, f"{type(err).__name__}: {err}"))
                    seen.discard(e.rel)
            gone = [k for k in self.files if k not in seen]
            removed_chunks = sum(self.remove_source(k) for k in gone + [t[0] for t in todo])
            embedded = self.add_sources(todo, progress=progress)
            new_skipped = [{"path": s.path, "reason": s.reason} for s in skipped]
            changed = todo or gone or new_skipped != self.skipped or self.version == 0
            self.skipped = new_skipped
            redone = {t[0] for t in todo}
            self.warnings = [w for w in self.warnings if w["path"] in seen and w["path"] not in redone] + warnings
            if changed:  # an unchanged folder leaves the live version alone
                self.commit()
        return {"files": len(self.files), "indexed": len(todo), "unchanged": unchanged, "removed": len(gone),
                "chunks": len(self.chunks), "embedded": embedded, "removed_chunks": removed_chunks,
                "skipped": self.skipped, "warnings": warnings, "seconds": round(time.perf_counter() - t0, 3),
                "version": self.version}

    def _chunk(self, rel: str, pages) -> tuple[list[Chunk], list[bytes | None]]:
        chunks, imgs = [], []
        for p in pages:
            if p.kind == "image":  # one chunk per image: its OCR text/caption, its pixels for image towers
                if p.text.strip() or self.embedder.supports_images:
                    chunks.append(Chunk(p.text, rel, None, None, 0, len(p.text), "image"))
                    imgs.append(p.image)
                continue
            for c in self.chunker.split(p.text, rel, p.page, p.kind):
                chunks.append(c)
                imgs.append(None)
        return chunks, imgs

    # ---- persistence -------------------------------------------------------------------------------
    def manifest(self) -> dict:
        return {"format_version": FORMAT_VERSION, "version": self.version, "tokenizer": TOKENIZER_ID,
                "embedder": self.embedder.spec(), "embedder_name": self.embedder.name,
                "chunker": vars(self.chunker.config), "dense_kind": self.dense.kind,
                "bm25": {"k1": self.bm25.k1, "b": self.bm25.b, "epsilon": self.bm25.epsilon},
                "root": self.root, "next_id": self.next_id, "n_chunks": len(self.chunks),
                "files": self.files, "skipped": self.skipped, "warnings": self.warnings}

    def commit(self) -> Path:
        """Write a new version and make it live atomically (see module docstring)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        self.version += 1
        with open(tmp / "chunks.jsonl", "w", encoding="utf-8") as f:
            for i in sorted(self.chunks):
                f.write(json.dumps(self.chunks[i].to_dict(), ensure_ascii=False) + "\n")
        self.bm25.save(tmp / "bm25")
        self.dense.save(tmp / "dense")
        if self.embedder.needs_fit:
            self.embedder.save(tmp / "embedder")
        (tmp / "manifest.json").write_text(json.dumps(self.manifest(), ensure_ascii=False, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        name = f"v{self.version:06d}"
        final = self.path / name
        if final.exists():  # left by a run killed after its rename but before its CURRENT swap
            shutil.rmtree(final)
        os.replace(tmp, final)
        cur_tmp = self.path / f".CURRENT-{uuid.uuid4().hex}"
        with open(cur_tmp, "w", encoding="utf-8") as f:
            f.write(name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(cur_tmp, self.path / "CURRENT")
        _fsync_dir(self.path)
        self._clean(keep={name})
        return final

    def _clean(self, keep: set[str]) -> None:
        """Remove stale temporary folders and all versions but the live one and its predecessor."""
        versions = sorted(p.name for p in self.path.glob("v[0-9]*") if p.is_dir())
        older = [v for v in versions if v < min(keep)]
        keep = keep | set(older[-1:])  # readers that opened the previous version a moment ago still find it
        for p in self.path.iterdir():
            if p.name.startswith((".tmp-", ".CURRENT-")) or (p.name in versions and p.name not in keep):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _lock(self):
        """One writer at a time per index folder (POSIX advisory lock; readers never block)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            try:
                import fcntl
                fcntl.flock(f, fcntl.LOCK_EX)
            except ImportError:
                pass
            yield

    # ---- searching ---------------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, mode: str = "hybrid", fetch_k: int = 50, fusion: str = "weighted",
               weights: dict[str, float] | None = None, rrf_k: float = 60.0, reranker=None, rerank_k: int = 20,
               mmr_lambda: float | None = None) -> list[Hit]:
        """Top-k chunks for `query`. mode: "bm25", "dense" or "hybrid" (fused over a shared candidate pool).

        Optional stages: `reranker` (rag.rerank) rescoring the top `rerank_k`, then MMR diversity.
        A blank query finds nothing (`[]`), rather than k chunks that all score 0.
        """
        if mode not in ("bm25", "dense", "hybrid"):
            raise ValueError(f"mode must be bm25, dense or hybrid, not {mode!r}")
        if not self.chunks or not query.strip():
            return []
        pool = max(k, fetch_k if (mode == "hybrid" or reranker or mmr_lambda is not None) else k)
        cols: dict[str, np.ndarray] = {}
        qvec = None
        if mode in ("bm25", "hybrid"):
            q_tokens = tokenize(query)
            b_ids, b_scores, b_all = self.bm25.search(q_tokens, pool, return_all=True)
        if mode in ("dense", "hybrid") or mmr_lambda is not None:
            qvec = self.embedder.embed_query(query)
        if mode in ("dense", "hybrid"):
            d_ids, d_scores = self.dense.search(qvec, pool)
        if mode == "bm25":
            ids, cols["bm25"] = b_ids, b_scores
        elif mode == "dense":
            ids, cols["dense"] = d_ids, d_scores
        else:
            ids = np.array(list(dict.fromkeys(d_ids.tolist() + b_ids.tolist())), np.int64)
            cols["dense"] = self.dense.vectors(ids) @ qvec if len(ids) else np.zeros(0)
            cols["bm25"] = self.bm25.scores_for(q_tokens, ids, b_all)
        if not len(ids):
            return []
        if mode == "hybrid":
            w = weights or {"dense": self.embedder.dense_weight, "bm25": 1 - self.embedder.dense_weight}
            score = fuse(cols, fusion, w, rrf_k)
        else:
            score = next(iter(cols.values())).astype(np.float64)
        order = np.lexsort((np.arange(len(ids)), -score))
        hits = [Hit(self.chunks[int(ids[i])], float(score[i]), {n: float(c[i]) for n, c in cols.items()}) for i in order]
        if reranker is not None:
            hits = reranker.rerank(query, hits[:rerank_k]) + hits[rerank_k:]
        if mmr_lambda is not None:
            from .rerank import mmr
            hits = mmr(qvec, hits, self.dense.vectors([h.chunk.id for h in hits]), k, mmr_lambda)
        return hits[:k]

    def __len__(self) -> int:
        return len(self.chunks)


def _refit(embedder: Embedder) -> Embedder:
    """A fresh copy of a fitted embedder (rebuild refits on the new corpus); others are reused."""
    return embedder_from_spec(embedder.spec()) if embedder.needs_fit else embedder


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

