"""Document RAG: index a folder (text, Markdown, HTML, PDF, images), hybrid BM25 + dense FAISS retrieval,
fusion, reranking and grounded answers. `python -m rag index DIR --index PATH`, `python -m rag query ...`.

Models (embedders, rerankers, the LM) load only when used.
"""
from __future__ import annotations

from .answer import Answer, AnswerStream, answer  # binds rag.answer to the function, not the module
from .bm25 import BM25
from .chunking import Chunk, Chunker, ChunkerConfig
from .embedders import Embedder, HashedNgramLSA, OpenClipEmbedder, SentenceTransformerEmbedder, make_embedder
from .index import Hit, Index
from .ingest import IngestConfig
from .tokenize import tokenize


def as_langchain_retriever(*args, **kwargs):
    """A langchain_core BaseRetriever over an Index; see rag.langchain.as_langchain_retriever."""
    from .langchain import as_langchain_retriever as _make

    return _make(*args, **kwargs)


__all__ = ["Answer", "AnswerStream", "BM25", "Chunk", "Chunker", "ChunkerConfig", "Embedder", "HashedNgramLSA", "Hit", "Index",
           "IngestConfig", "OpenClipEmbedder", "SentenceTransformerEmbedder", "answer", "as_langchain_retriever",
           "make_embedder", "tokenize"]
