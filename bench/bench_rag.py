"""RAG retrieval at 50k chunks: our BM25 vs rank_bm25, and our hybrid index vs LangChain's, in one run.

`python bench/bench_rag.py [--rounds 3] [--cache-dir DIR] [--skip-langchain] [--live-queries]`

Corpus: msmarco-5k + 45k word windows of its passages (bench_rag_data.corpus_50k), judged at passage
level with msmarco's qrels (43 queries); both contenders retrieve 30 chunks per query and are scored on
the first 10 distinct passages. Embedder: all-MiniLM-L6-v2 (../shared/models), vectors computed once and
cached (bench_rag_data.cached_embeddings); both contenders read the same vectors, so index-build times
exclude model inference for both. With `--live-queries` each contender embeds the query with MiniLM at
query time through its own normal path: ours `rag.SentenceTransformerEmbedder.embed_query` (its fast
single-query path; LRU query cache off, so nothing is answered from a cache), LangChain
`HuggingFaceEmbeddings(encode_kwargs={"normalize_embeddings": True})` (sentence-transformers `encode`).
Both models are loaded and warmed up before timing; the two query vectors are checked equal
(`query_vec_max_abs_diff`) and the encoding alone is timed too (`query_embed_p50_ms`).

1. BM25 (same tokens for both: rag.tokenize): scores and top-10 of every query vs rank_bm25.BM25Okapi;
   build time; query throughput (contenders alternate, order rotating per round; median ratio).
2. Hybrid: ours (`rag.Index`: sparse BM25 + FAISS IndexIDMap2(FlatIP) + weighted fusion, dense weight
   0.8, written atomically to disk) vs LangChain (`BM25Retriever` with our tokenizer, FAISS vectorstore
   with inner product, `langchain_classic` EnsembleRetriever with its RRF; kept in memory, since its only
   persistence is pickle). Build time, p50/p95 query latency, nDCG@10 / MRR@10 / Recall@10.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rag_data import (DEFAULT_CACHE, MINILM, MSMARCO, LookupVectors, cached_embeddings,  # noqa: E402
                            corpus_50k, langchain_embeddings, load_beir, ours_embedder)

from rag.bm25 import BM25  # noqa: E402
from rag.chunking import Chunk  # noqa: E402
from rag.eval import metrics  # noqa: E402
from rag.index import Index  # noqa: E402
from rag.tokenize import tokenize  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bm25_part(texts: list[str], queries: list[str], rounds: int) -> dict:
    from rank_bm25 import BM25Okapi

    tokens, tok_s = timed(lambda: [tokenize(t) for t in texts])
    q_tokens = [tokenize(q) for q in queries]
    ours, ours_build = timed(lambda: _bm25(tokens))
    ref, ref_build = timed(lambda: BM25Okapi(tokens))
    max_diff, ids_equal = 0.0, 0
    for q in q_tokens:
        expected = ref.get_scores(q)
        want = np.lexsort((np.arange(len(expected)), -expected))[:10]
        ids, scores = ours.search(q, 10)
        ids_equal += list(ids) == list(want)
        max_diff = max(max_diff, float(np.abs(scores - expected[want]).max()),
                       float(np.abs(ours.get_scores(q) - expected).max()))
    times = {"ours": [], "rank_bm25": []}
    run = {"ours": lambda q: ours.search(q, 10), "rank_bm25": lambda q: np.argsort(ref.get_scores(q))[::-1][:10]}
    names = list(run)
    for r in range(rounds):
        for name in names[r % 2:] + names[: r % 2]:
            _, s = timed(lambda: [run[name](q) for q in q_tokens])
            times[name].append(s)
    ratios = [b / a for a, b in zip(times["ours"], times["rank_bm25"])]
    return {"docs": len(texts), "queries": len(queries), "tokenize_s": round(tok_s, 2),
            "build_s": {"ours": round(ours_build, 3), "rank_bm25": round(ref_build, 3)},
            "top10_ids_equal": f"{ids_equal}/{len(queries)}", "max_abs_score_diff": max_diff,
            "qps": {"ours": round(len(queries) / statistics.median(times["ours"]), 1),
                    "rank_bm25": round(len(queries) / statistics.median(times["rank_bm25"]), 2)},
            "speedup_median": round(statistics.median(ratios), 1)}


def _bm25(tokens):
    b = BM25()
    b.add(range(len(tokens)), tokens)
    b._weights()  # include building the weight matrix in the build time
    return b


def first_passages(sources: list[str], k: int = 10) -> list[str]:
    return list(dict.fromkeys(sources))[:k]


def cached_docs_live_queries(docs, live):
    """Our embedder for --live-queries: document vectors from the cache, queries through the live model."""
    from rag.embedders import Embedder

    class CachedDocsLiveQueries(Embedder):
        dim, name, dense_weight = docs.dim, docs.name, docs.dense_weight

        def spec(self):
            return docs.spec()

        def _embed(self, texts, progress):
            return docs._embed(texts, progress)

        def embed_query(self, text):
            return live.embed_query(text)

    return CachedDocsLiveQueries()


def hybrid_part(texts, sources, queries, qrels, lookup, rounds: int, live_queries: bool) -> dict:
    from langchain_classic.retrievers import EnsembleRetriever
    from langchain_community.retrievers import BM25Retriever
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy

    tmp = Path(tempfile.mkdtemp(prefix="bench-rag-"))
    ours_emb, lc_emb = ours_embedder(lookup), langchain_embeddings(lookup)
    if live_queries:  # each contender's own MiniLM query path, loaded before any timing
        from langchain_community.embeddings import HuggingFaceEmbeddings

        from rag.embedders import SentenceTransformerEmbedder

        ours_live = SentenceTransformerEmbedder(str(MINILM), query_cache=0)
        ours_emb = cached_docs_live_queries(ours_emb, ours_live)
        lc_emb = HuggingFaceEmbeddings(model_name=str(MINILM), model_kwargs={"device": "cpu"},
                                       encode_kwargs={"normalize_embeddings": True})

    def build_ours():
        idx = Index(tmp / "idx", ours_emb)
        idx.add_sources([(f"c{i}", "", [Chunk(t, src, end=len(t))], [None])
                         for i, (t, src) in enumerate(zip(texts, sources))])
        idx.commit()
        return idx

    def build_langchain():
        meta = [{"src": s} for s in sources]
        bm25 = BM25Retriever.from_texts(texts, metadatas=meta, preprocess_func=tokenize, k=30)
        vecs = lookup.get(texts)
        store = FAISS.from_embeddings(list(zip(texts, vecs.tolist())), lc_emb, metadatas=meta,
                                      distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
        return EnsembleRetriever(retrievers=[bm25, store.as_retriever(search_kwargs={"k": 30})], weights=[0.5, 0.5])

    ours, ours_build = timed(build_ours)
    lc, lc_build = timed(build_langchain)
    qids = sorted(qrels)
    live = {}
    if live_queries:  # warm up both encoders, check they agree, time the encoding alone
        enc = {"ours": ours_emb.embed_query, "langchain": lambda t: np.asarray(lc_emb.embed_query(t), np.float32)}
        for f in enc.values():
            f("warm-up query")
        enc_ms, vecs = {n: [] for n in enc}, {n: [] for n in enc}
        for i, q in enumerate(qids):
            for name in (list(enc) if i % 2 == 0 else list(enc)[::-1]):
                v, s = timed(lambda: enc[name](queries[q]))
                enc_ms[name].append(s * 1000)
                vecs[name].append(v)
        live = {"ours_query_encoder": f"rag.SentenceTransformerEmbedder.embed_query (fast path: {ours_live.fast_path})",
                "langchain_query_encoder": "langchain_community HuggingFaceEmbeddings (sentence-transformers encode)",
                "query_vec_max_abs_diff": float(np.abs(np.stack(vecs["ours"]) - np.stack(vecs["langchain"])).max()),
                "query_embed_p50_ms": {n: round(statistics.median(t), 2) for n, t in enc_ms.items()}}
    run = {"ours": lambda q: first_passages([h.chunk.path for h in ours.search(q, k=30)]),
           "langchain": lambda q: first_passages([d.metadata["src"] for d in lc.invoke(q)])}
    lat = {n: [] for n in run}
    rankings = {}
    names = list(run)
    for r in range(rounds):
        for name in names[r % 2:] + names[: r % 2]:
            for q in qids:
                ranking, s = timed(lambda: run[name](queries[q]))
                lat[name].append(s * 1000)
                rankings[(name, q)] = ranking
    out = {"chunks": len(texts), "queries": len(qids), "live_query_embedding": live_queries,
           "build_s": {"ours_incl_atomic_save": round(ours_build, 2), "langchain_in_memory": round(lc_build, 2)},
           "build_ratio_langchain_over_ours": round(lc_build / ours_build, 2), **live}
    for name in names:
        m = [metrics(rankings[(name, q)], qrels[q]) for q in qids]
        out[name] = {k: round(float(np.mean([x[k] for x in m])), 4) for k in ("ndcg@10", "mrr@10", "recall@10")}
        out[name]["p50_ms"] = round(statistics.median(lat[name]), 2)
        out[name]["p95_ms"] = round(float(np.percentile(lat[name], 95)), 2)
    out["p50_ratio_langchain_over_ours"] = round(out["langchain"]["p50_ms"] / out["ours"]["p50_ms"], 1)
    for mode in ("bm25", "dense"):
        m = [metrics(first_passages([h.chunk.path for h in ours.search(queries[q], k=30, mode=mode)]), qrels[q])
             for q in qids]
        out[f"ours_{mode}_only_ndcg@10"] = round(float(np.mean([x["ndcg@10"] for x in m])), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--skip-bm25", action="store_true")
    p.add_argument("--skip-langchain", action="store_true")
    p.add_argument("--live-queries", action="store_true", help="embed queries with MiniLM at query time")
    args = p.parse_args(argv)
    if not MSMARCO.is_dir() or not MINILM.is_dir():
        sys.exit(f"needs {MSMARCO} and {MINILM}")
    texts, sources = corpus_50k()
    _, queries, qrels = load_beir(MSMARCO)
    result = {}
    if not args.skip_bm25:
        result["bm25_vs_rank_bm25"] = bm25_part(texts, [queries[q] for q in sorted(queries)], args.rounds)
    if not args.skip_langchain:
        qtexts = [queries[q] for q in sorted(qrels)]
        lookup = LookupVectors(texts + qtexts, np.concatenate([cached_embeddings(texts, cache_dir=args.cache_dir),
                                                               cached_embeddings(qtexts, cache_dir=args.cache_dir)]))
        result["hybrid_vs_langchain"] = hybrid_part(texts, sources, queries, qrels, lookup, args.rounds,
                                                    args.live_queries)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
