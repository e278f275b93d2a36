"""Retrieval evaluation: `python -m rag.eval --beir DIR | --cmrc FILE [--embedder PATH] [--reranker ...]`.

Prints one JSON object: for each of bm25 / dense / hybrid (/ hybrid+rerank with --reranker) the
trec_eval nDCG@10 (linear gains = qrels grades, ideal DCG from all judged relevant documents), the
same with exponential gains 2^grade - 1 (`ndcg@10_exp`, the definition behind the reference figures in
shared/data/README.md; equal to the linear one for binary qrels such as CMRC's), MRR@10,
Recall@10, Hit@{1,3,5,10}, and p50/p95 query latency in ms. Passages are indexed whole (one chunk each),
through the same `rag.Index` the CLI uses (kept in memory). Queries without a relevant document in
the corpus are left out, as BEIR does.

- BEIR layout: corpus.jsonl (`_id`, `title`, `text`), queries.jsonl, qrels/test.tsv.
- CMRC 2018 (SQuAD-like JSON list): the corpus is the passages; each question's gold is its passage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .chunking import Chunk
from .embedders import Embedder, make_embedder
from .index import Index


# ---- data ----------------------------------------------------------------------------------------
def load_beir(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    folder = Path(folder)
    corpus = {}
    for n, line in enumerate(open(folder / "corpus.jsonl", encoding="utf-8"), 1):
        if line.strip():
            try:
                r = json.loads(line)
                corpus[str(r["_id"])] = (r.get("title", "") + " " + r["text"]).strip()
            except (ValueError, KeyError) as e:
                raise ValueError(f"{folder / 'corpus.jsonl'} line {n}: {e}") from None
    queries = {str(q["_id"]): q["text"] for q in map(json.loads, open(folder / "queries.jsonl", encoding="utf-8"))}
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate(open(folder / "qrels" / f"{split}.tsv", encoding="utf-8"), 1):
        parts = line.rstrip("\n").split("\t")
        if n == 1 and not parts[-1].lstrip("-").isdigit():
            continue
        if len(parts) != 3:
            raise ValueError(f"{folder / 'qrels' / (split + '.tsv')} line {n}: expected 3 tab-separated fields")
        if int(parts[2]) > 0 and parts[1] in corpus and parts[0] in queries:
            qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return corpus, queries, qrels


def load_cmrc(path: str | Path) -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data = data.get("data", data) if isinstance(data, dict) else data
    corpus, queries, qrels = {}, {}, {}
    for i, rec in enumerate(data):
        try:
            cid = str(rec["context_id"])
            corpus[cid] = rec["context_text"]
            for q in rec["qas"]:
                queries[q["query_id"]] = q["query_text"]
                qrels[q["query_id"]] = {cid: 1}
        except KeyError as e:
            raise ValueError(f"{path}: record {i}: missing field {e}") from None
    return corpus, queries, qrels


# ---- metrics (trec_eval definitions) -------------------------------------------------------------
def ndcg(ranking: list[str], rels: dict[str, int], k: int = 10, exponential: bool = False) -> float:
    """nDCG@k; ideal DCG from all judged relevant documents. Gains: the grade (trec_eval), or 2^grade - 1."""
    gain = (lambda r: 2.0 ** r - 1) if exponential else float
    dcg = sum(gain(rels.get(d, 0)) / np.log2(i + 2) for i, d in enumerate(ranking[:k]))
    idcg = sum(gain(r) / np.log2(i + 2) for i, r in enumerate(sorted(rels.values(), reverse=True)[:k]))
    return dcg / idcg if idcg else 0.0


def metrics(ranking: list[str], rels: dict[str, int], k: int = 10) -> dict[str, float]:
    """trec_eval's nDCG@10 (linear gains), the exponential-gain variant (2^grade - 1, which the reference
    figures in shared/data/README.md use: it matters for graded qrels such as msmarco's 1-3), MRR@10,
    Recall@10 and Hit@k."""
    first = next((i for i, d in enumerate(ranking[:k]) if rels.get(d, 0) > 0), None)
    out = {"ndcg@10": ndcg(ranking, rels, k), "ndcg@10_exp": ndcg(ranking, rels, k, exponential=True),
           "mrr@10": 1.0 / (first + 1) if first is not None else 0.0,
           "recall@10": sum(1 for d in set(ranking[:k]) if rels.get(d, 0) > 0) / len(rels)}
    for h in (1, 3, 5, 10):
        out[f"hit@{h}"] = float(first is not None and first < h)
    return out


def evaluate(index: Index, queries: dict[str, str], qrels: dict[str, dict[str, int]], id_of: dict[int, str],
             **search_kw) -> dict:
    per_query, lat = [], []
    for qid in sorted(qrels):
        t0 = time.perf_counter()
        hits = index.search(queries[qid], k=10, **search_kw)
        lat.append((time.perf_counter() - t0) * 1000)
        ranking = list(dict.fromkeys(id_of[h.chunk.id] for h in hits))
        per_query.append(metrics(ranking, qrels[qid]))
    out = {m: round(float(np.mean([p[m] for p in per_query])), 4) for m in per_query[0]}
    out["p50_ms"] = round(statistics.median(lat), 2)
    out["p95_ms"] = round(float(np.percentile(lat, 95)), 2)
    out["queries"] = len(per_query)
    return out


# ---- building ------------------------------------------------------------------------------------
class CachedEmbedder(Embedder):
    """Document embeddings of another embedder, cached on disk by text hash (re-runs skip the model)."""

    def __init__(self, inner: Embedder, cache_dir: str | Path):
        self.inner, self.dim, self.name = inner, inner.dim, inner.name
        self.dense_weight, self.needs_fit = inner.dense_weight, inner.needs_fit
        self.file = Path(cache_dir) / f"{hashlib.sha256(inner.name.encode()).hexdigest()[:12]}"

    def spec(self) -> dict:
        return self.inner.spec()

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        known: dict[str, np.ndarray] = {}
        if self.file.with_suffix(".npy").is_file():
            vecs = np.load(self.file.with_suffix(".npy"), allow_pickle=False)
            known = dict(zip(json.loads(self.file.with_suffix(".json").read_text()), vecs))
        missing = [i for i, k in enumerate(keys) if k not in known]
        if missing:
            new = self.inner.embed_documents([texts[i] for i in missing], progress)
            known.update((keys[i], v) for i, v in zip(missing, new))
            if len(texts) > 1:  # cache corpora, not one-off queries
                self.file.parent.mkdir(parents=True, exist_ok=True)
                np.save(self.file.with_suffix(".npy"), np.stack(list(known.values())), allow_pickle=False)
                self.file.with_suffix(".json").write_text(json.dumps(list(known)))
        return np.stack([known[k] for k in keys])

    def embed_query(self, text: str) -> np.ndarray:
        return self.inner.embed_query(text)

    def fit(self, texts) -> None:
        self.inner.fit(texts)


def build(corpus: dict[str, str], embedder: Embedder, progress: bool = False) -> tuple[Index, dict[int, str], float]:
    """An in-memory index with one chunk per passage; returns (index, chunk id -> doc id, build seconds)."""
    index = Index(Path(tempfile.gettempdir()) / "rag-eval-unused", embedder)
    t0 = time.perf_counter()
    sources = [(doc_id, "", [Chunk(text, doc_id, end=len(text))], [None]) for doc_id, text in corpus.items()]
    index.add_sources(sources, progress=progress)
    id_of = {c.id: c.path for c in index.chunks.values()}
    return index, id_of, time.perf_counter() - t0


def make_reranker(spec: str):
    from .rerank import CrossEncoderReranker, LMReranker

    if spec.startswith("lm:"):
        return LMReranker.from_pretrained(spec[3:])
    return CrossEncoderReranker(spec)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rag.eval", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--beir", help="BEIR-layout folder")
    src.add_argument("--cmrc", help="CMRC 2018 JSON file")
    p.add_argument("--embedder", default=None, help="sentence-transformers path (default: offline hashed n-gram LSA)")
    p.add_argument("--reranker", default=None, help="CrossEncoder path, or lm:DIR for the MiniMind LM reranker")
    p.add_argument("--mmr", type=float, default=None, help="also evaluate hybrid+MMR with this lambda")
    p.add_argument("--fusion", choices=["weighted", "rrf"], default="weighted")
    p.add_argument("--dense-weight", type=float, default=None, help="default: the embedder's own")
    p.add_argument("--rrf-k", type=float, default=60.0)
    p.add_argument("--fetch-k", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="also report hybrid for a grid of fusion settings")
    p.add_argument("--cache", default=None, help="folder caching document embeddings between runs")
    p.add_argument("--max-queries", type=int, default=None)
    args = p.parse_args(argv)

    corpus, queries, qrels = load_beir(args.beir) if args.beir else load_cmrc(args.cmrc)
    if args.max_queries:
        qrels = dict(sorted(qrels.items())[: args.max_queries])
    embedder = make_embedder(args.embedder)
    if args.cache:
        embedder = CachedEmbedder(embedder, args.cache)
    index, id_of, build_s = build(corpus, embedder, progress=True)
    w = args.dense_weight if args.dense_weight is not None else embedder.dense_weight
    hybrid = {"mode": "hybrid", "fusion": args.fusion, "weights": {"dense": w, "bm25": 1 - w},
              "rrf_k": args.rrf_k, "fetch_k": args.fetch_k}
    result = {"dataset": args.beir or args.cmrc, "docs": len(corpus), "queries": len(qrels),
              "embedder": embedder.name, "build_s": round(build_s, 2),
              "fusion": {"method": args.fusion, "dense_weight": w, "rrf_k": args.rrf_k, "fetch_k": args.fetch_k}}
    result["bm25"] = evaluate(index, queries, qrels, id_of, mode="bm25")
    result["dense"] = evaluate(index, queries, qrels, id_of, mode="dense")
    result["hybrid"] = evaluate(index, queries, qrels, id_of, **hybrid)
    if args.reranker:
        result["hybrid+rerank"] = evaluate(index, queries, qrels, id_of, reranker=make_reranker(args.reranker), **hybrid)
    if args.mmr is not None:
        result["hybrid+mmr"] = evaluate(index, queries, qrels, id_of, mmr_lambda=args.mmr, **hybrid)
    if args.sweep:
        grid = {}
        for dw in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
            r = evaluate(index, queries, qrels, id_of, mode="hybrid", weights={"dense": dw, "bm25": 1 - dw},
                         fetch_k=args.fetch_k)
            grid[f"weighted dense={dw}"] = (r["ndcg@10"], r["ndcg@10_exp"])
        for dw in (0.5, 0.6, 0.7, 0.8):
            r = evaluate(index, queries, qrels, id_of, mode="hybrid", fusion="rrf", rrf_k=args.rrf_k,
                         weights={"dense": dw, "bm25": 1 - dw}, fetch_k=args.fetch_k)
            grid[f"rrf k={args.rrf_k:g} dense={dw}"] = (r["ndcg@10"], r["ndcg@10_exp"])
        result["sweep_ndcg@10_linear_exp"] = grid
    print(json.dumps(result, ensure_ascii=False, indent=1))
    return result


if __name__ == "__main__":
    main()
