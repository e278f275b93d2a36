"""`python -m rag index DIR --index PATH` and `python -m rag query "..." --index PATH`."""
from __future__ import annotations

import argparse
import json
import sys

from .chunking import ChunkerConfig
from .embedders import make_embedder
from .index import Index
from .ingest import IngestConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rag", description="Index a document folder and query it.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("index", help="build or incrementally update an index of a folder")
    pi.add_argument("folder")
    pi.add_argument("--index", required=True, help="index folder (created if missing)")
    pi.add_argument("--embedder", default=None,
                    help="default: offline hashed n-gram LSA; a sentence-transformers path; or clip:MODEL[:PRETRAINED]")
    pi.add_argument("--chunk-size", type=int, default=600)
    pi.add_argument("--chunk-overlap", type=int, default=100)
    pi.add_argument("--chunk-unit", choices=["chars", "tokens"], default="chars")
    pi.add_argument("--max-file-mb", type=float, default=50)
    pi.add_argument("--no-ocr", action="store_true", help="skip OCR of images and scanned PDF pages")
    pi.add_argument("--rebuild", action="store_true", help="start from scratch (refits the offline embedder)")
    pi.add_argument("--quiet", action="store_true", help="no progress bars")

    pq = sub.add_parser("query", help="search an index")
    pq.add_argument("query")
    pq.add_argument("--index", required=True)
    pq.add_argument("-k", type=int, default=5)
    pq.add_argument("--mode", choices=["hybrid", "bm25", "dense"], default="hybrid")
    pq.add_argument("--fusion", choices=["weighted", "rrf"], default="weighted")
    pq.add_argument("--reranker", default=None, help="a sentence-transformers CrossEncoder path")
    pq.add_argument("--mmr", type=float, default=None, metavar="LAMBDA", help="MMR diversity (e.g. 0.7)")
    pq.add_argument("--json", action="store_true", help="print hits as JSON lines")
    args = p.parse_args(argv)
    if args.cmd == "query" and not args.query.strip():
        p.error("the query is empty")
    try:
        return _run(args)
    except OSError as e:  # a missing folder or index, an unreadable path: one line, not a traceback
        p.exit(2, f"{p.prog}: error: {e}\n")


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "index":
        ingest = IngestConfig(max_file_bytes=int(args.max_file_mb * 2**20), ocr=not args.no_ocr)
        chunker = ChunkerConfig(args.chunk_size, args.chunk_overlap, args.chunk_unit)
        try:
            index = Index.open(args.index, make_embedder(args.embedder) if args.embedder else None)
            index.ingest = ingest
            if vars(index.chunker.config) != vars(chunker) and not args.rebuild:
                print(f"note: chunker settings differ from the index's {vars(index.chunker.config)}; "
                      "pass --rebuild to re-chunk everything", file=sys.stderr)
        except FileNotFoundError:
            index = Index(args.index, make_embedder(args.embedder), chunker, ingest=ingest)
        report = index.index_folder(args.folder, progress=not args.quiet, rebuild=args.rebuild)
        for s in report["skipped"]:
            print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
        for w in report["warnings"]:
            print(f"warning {w['path']}: {w['warning']}", file=sys.stderr)
        summary = {k: v for k, v in report.items() if k not in ("skipped", "warnings")}
        summary["skipped"] = len(report["skipped"])
        print(json.dumps(summary))
        return 0

    index = Index.open(args.index)
    reranker = None
    if args.reranker:
        from .rerank import CrossEncoderReranker
        reranker = CrossEncoderReranker(args.reranker)
    hits = index.search(args.query, k=args.k, mode=args.mode, fusion=args.fusion, reranker=reranker,
                        mmr_lambda=args.mmr)
    for rank, h in enumerate(hits, 1):
        c = h.chunk
        if args.json:
            print(json.dumps({"rank": rank, "score": h.score, **c.to_dict()}, ensure_ascii=False))
            continue
        where = c.path + (f" p.{c.page}" if c.page else "") + (f" [{c.heading}]" if c.heading else "")
        snippet = " ".join(c.text.split())[:200]
        print(f"{rank}. {h.score:.4f}  {where}  chars {c.start}-{c.end}\n   {snippet}")
    if not hits:
        print("no results", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
