"""Retrieval quality of the default configurations, and the fusion sweep their defaults come from.

`python bench/bench_rag_quality.py [--cache-dir DIR] [--skip-cmrc]`

- msmarco-5k with all-MiniLM-L6-v2 (vectors from the bench cache, see bench_rag_data.py; the same
  numbers come from `python -m rag.eval --beir ../shared/data/msmarco-5k --embedder ../shared/models/
  all-MiniLM-L6-v2`, which embeds live): bm25, dense, hybrid (default: weighted min-max fusion, dense
  weight 0.8), naive equal-weight RRF k=60 (the shared/data/README reference), and a sweep.
- CMRC 2018 trial with the defaults and no pretrained weights (offline hashed n-gram LSA embedder).
Prints JSON; nDCG@10 etc. are trec_eval definitions (rag.eval.metrics).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rag_data import (DEFAULT_CACHE, MSMARCO, SHARED, LookupVectors, cached_embeddings,  # noqa: E402
                            corpus_50k, ours_embedder)

from rag.embedders import HashedNgramLSA  # noqa: E402
from rag.eval import build, evaluate, load_beir, load_cmrc  # noqa: E402


def msmarco(cache_dir: Path) -> dict:
    corpus, queries, qrels = load_beir(MSMARCO)
    texts, _ = corpus_50k()
    qtexts = [queries[q] for q in sorted(qrels)]
    vecs = cached_embeddings(texts, cache_dir=cache_dir)[:5000]  # the first 5,000 chunks are the passages
    lookup = LookupVectors(texts[:5000] + qtexts, np.concatenate([vecs, cached_embeddings(qtexts, cache_dir=cache_dir)]))
    index, id_of, _ = build(corpus, ours_embedder(lookup))
    assert lookup.misses == 0, "corpus texts differ from the cached ones"
    ev = lambda **kw: evaluate(index, queries, qrels, id_of, **kw)  # noqa: E731
    out = {"bm25": ev(mode="bm25"), "dense": ev(mode="dense"), "hybrid (default)": ev(mode="hybrid"),
           "rrf k=60 equal weights": ev(mode="hybrid", fusion="rrf", weights={"dense": 1, "bm25": 1}),
           "hybrid+mmr(0.9)": ev(mode="hybrid", mmr_lambda=0.9)}
    sweep = {}
    pick = lambda r: (r["ndcg@10"], r["ndcg@10_exp"])  # noqa: E731
    for w in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9):
        sweep[f"weighted dense={w}"] = pick(ev(mode="hybrid", weights={"dense": w, "bm25": 1 - w}))
    for k in (10, 60):
        for w in (0.5, 0.7, 0.8, 0.9):
            sweep[f"rrf k={k} dense={w}"] = pick(ev(mode="hybrid", fusion="rrf", rrf_k=k,
                                                    weights={"dense": w, "bm25": 1 - w}))
    out["sweep_ndcg@10_linear_exp"] = sweep
    return out


def cmrc() -> dict:
    corpus, queries, qrels = load_cmrc(SHARED / "data" / "cmrc2018_trial.json")
    index, id_of, build_s = build(corpus, HashedNgramLSA())
    ev = lambda **kw: evaluate(index, queries, qrels, id_of, **kw)  # noqa: E731
    return {"embedder": index.embedder.name, "build_s": round(build_s, 2), "bm25": ev(mode="bm25"),
            "dense": ev(mode="dense"), "hybrid (default)": ev(mode="hybrid")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--skip-cmrc", action="store_true")
    p.add_argument("--skip-msmarco", action="store_true")
    args = p.parse_args(argv)
    out = {}
    if not args.skip_msmarco:
        out["msmarco-5k (MiniLM)"] = msmarco(args.cache_dir)
    if not args.skip_cmrc:
        out["cmrc2018_trial (offline default)"] = cmrc()
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return out


if __name__ == "__main__":
    main()
