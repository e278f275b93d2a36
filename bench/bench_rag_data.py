"""Shared data for the RAG benchmarks: the msmarco-5k set, a 50k-chunk corpus built from it, cached embeddings.

The 50k corpus: the 5,000 msmarco passages plus 9 windows of 20-40 consecutive words cut from each
passage at seeded random offsets (45,000 more chunks). Every chunk remembers the passage it came from,
so retrieval is judged at passage level (a window of a relevant passage counts as that passage; the
first hit of a passage wins, later ones are dropped) with msmarco's own qrels. Both contenders of a
benchmark see exactly the same chunks, query set and embeddings.

Embedding 50k chunks with MiniLM takes ~15 minutes on the shared 2-core box, so vectors are computed
once per (model, texts) and cached as .npy under `--cache-dir`; both contenders then read the same
vectors through a lookup embedder, and index-build timings exclude model inference for both.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
MSMARCO = SHARED / "data" / "msmarco-5k"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
DEFAULT_CACHE = Path.home() / ".cache" / "minimind-v" / "bench_rag"


def load_beir(folder: Path) -> tuple[list[dict], dict[str, str], dict[str, dict[str, int]]]:
    """(corpus records, {query id: text}, qrels {query id: {doc id: grade}}) of a BEIR folder."""
    corpus = [json.loads(line) for line in open(folder / "corpus.jsonl", encoding="utf-8") if line.strip()]
    queries = {}
    for line in open(folder / "queries.jsonl", encoding="utf-8"):
        if line.strip():
            q = json.loads(line)
            queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, int]] = {}
    for i, line in enumerate(open(folder / "qrels" / "test.tsv", encoding="utf-8")):
        parts = line.rstrip("\n").split("\t")
        if i == 0 and not parts[-1].lstrip("-").isdigit():
            continue  # header line
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return corpus, queries, qrels


def passage_text(rec: dict) -> str:
    return (rec.get("title", "") + " " + rec["text"]).strip()


def corpus_50k(windows_per_passage: int = 9, seed: int = 0) -> tuple[list[str], list[str]]:
    """(chunk texts, source passage id of each chunk): msmarco-5k plus seeded word windows of it."""
    corpus, _, _ = load_beir(MSMARCO)
    rng = random.Random(seed)
    texts = [passage_text(r) for r in corpus]
    sources = [str(r["_id"]) for r in corpus]
    for r in corpus:
        words = passage_text(r).split()
        for _ in range(windows_per_passage):
            n = rng.randint(20, 40)
            start = rng.randint(0, max(0, len(words) - n))
            texts.append(" ".join(words[start:start + n]))
            sources.append(str(r["_id"]))
    return texts, sources


def cached_embeddings(texts: list[str], model_path: Path = MINILM, cache_dir: Path = DEFAULT_CACHE,
                      batch_size: int = 64) -> np.ndarray:
    """Normalised float32 sentence-transformers embeddings of `texts`, computed once and cached."""
    key = hashlib.sha256(("\0".join([str(model_path)] + texts)).encode("utf-8")).hexdigest()[:16]
    path = Path(cache_dir) / f"emb-{Path(model_path).name}-{len(texts)}-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu")
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True,
                        convert_to_numpy=True).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, vecs, allow_pickle=False)
    tmp.replace(path)
    return vecs


if __name__ == "__main__":  # precompute the caches: python bench/bench_rag_data.py
    t, _ = corpus_50k()
    _, qs, qrels = load_beir(MSMARCO)
    cached_embeddings([qs[q] for q in sorted(qrels)])
    cached_embeddings(t)
    print("cached", len(t))


class LookupVectors:
    """text -> cached vector; texts not in the cache (none in these benchmarks) go through the live model."""

    def __init__(self, texts: list[str], vectors: np.ndarray, model_path: Path = MINILM):
        self.table = dict(zip(texts, vectors))
        self.model_path, self.model, self.misses = model_path, None, 0
        self.dim = vectors.shape[1]

    def get(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.table]
        if missing:
            self.misses += len(missing)
            if self.model is None:
                from sentence_transformers import SentenceTransformer
                self.model = SentenceTransformer(str(self.model_path), device="cpu")
            for t, v in zip(missing, self.model.encode(missing, normalize_embeddings=True)):
                self.table[t] = v.astype(np.float32)
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def ours_embedder(lookup: LookupVectors):
    """A rag Embedder answering from the cache, presenting itself as the MiniLM sentence-transformers one."""
    from rag.embedders import Embedder, SentenceTransformerEmbedder

    class Cached(Embedder):
        dim, name = lookup.dim, f"sentence-transformers({MINILM.name},dim={lookup.dim})+cache"
        dense_weight = SentenceTransformerEmbedder.dense_weight

        def spec(self):
            return {"kind": "sentence-transformers", "path": str(MINILM)}

        def _embed(self, texts, progress):
            return lookup.get(texts)

    return Cached()


def langchain_embeddings(lookup: LookupVectors):
    from langchain_core.embeddings import Embeddings

    class Cached(Embeddings):
        def embed_documents(self, texts):
            return lookup.get(list(texts)).tolist()

        def embed_query(self, text):
            return lookup.get([text])[0].tolist()

    return Cached()
