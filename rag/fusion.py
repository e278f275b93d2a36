"""Fusing retrievers: reciprocal rank fusion and weighted fusion of normalised scores.

Both work on one candidate pool (the union of every retriever's top `fetch_k`) where each candidate has
a score from *every* retriever: the index re-scores BM25-only candidates densely and dense-only ones
with BM25 (cheap: a dot product, a posting lookup). LangChain's EnsembleRetriever and LlamaIndex treat
a document missing from one list as absent there, which punishes exactly the documents only one
retriever found.

Why weighted fusion is the default: with a strong embedder, equal-weight RRF (k=60) *loses* to dense
alone on msmarco-5k (nDCG@10 0.678 vs 0.704 with 2^grade-1 gains, shared/data/README.md; we measure
0.677 vs 0.704): rank fusion throws away how much better the dense top hits are than the rest, and
equal weights let the weaker retriever vote as loudly as the stronger one. Min-max normalised scores
keep the margins, and the weight lets a strong embedder lead. The weight is the embedder's
`dense_weight`: 0.8 for sentence-transformers models (msmarco-5k sweep, bench/bench_rag_quality.py:
0.7996 / 0.7082 vs dense alone 0.7977 / 0.7043, linear / exponential gains), 0.5 for the offline
n-gram embedder (CMRC: hybrid 0.987 vs 0.984 dense, 0.979 BM25). Weighted RRF (`fusion="rrf"`, dense 0.8)
scored about the same (0.8031 / 0.7136); 43 queries cannot separate the two.
"""
from __future__ import annotations

import numpy as np


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate by descending score (ties: earlier candidate first)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    r = np.empty(len(scores), np.int64)
    r[order] = np.arange(1, len(scores) + 1)
    return r


def rrf(columns: dict[str, np.ndarray], weights: dict[str, float] | None = None, k: float = 60.0) -> np.ndarray:
    """Weighted reciprocal rank fusion: sum_i w_i / (k + rank_i)."""
    out = 0.0
    for name, s in columns.items():
        out = out + (weights or {}).get(name, 1.0) / (k + ranks(np.asarray(s, np.float64)))
    return np.asarray(out, np.float64)


def minmax(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, np.float64)
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


def weighted(columns: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """sum_i w_i * minmax(score_i) over the candidate pool."""
    return sum(weights.get(name, 0.0) * minmax(s) for name, s in columns.items())


def fuse(columns: dict[str, np.ndarray], method: str = "weighted", weights: dict[str, float] | None = None,
         rrf_k: float = 60.0) -> np.ndarray:
    if method == "rrf":
        return rrf(columns, weights, rrf_k)
    if method == "weighted":
        return weighted(columns, weights or {name: 1.0 / len(columns) for name in columns})
    raise ValueError(f"unknown fusion method {method!r} (use 'weighted' or 'rrf')")
