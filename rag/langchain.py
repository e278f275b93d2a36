"""Our index as a LangChain retriever: `rag.as_langchain_retriever(index)` -> `BaseRetriever`.

It yields `Document`s whose metadata carries our citation fields (source path, page, heading, span,
chunk id, score), so it drops into LCEL chains (`retriever | format_docs | prompt | llm`) while the
retrieval itself stays ours (sparse-matrix BM25, FAISS, score fusion).
"""
from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict


class IndexRetriever(BaseRetriever):
    index: Any
    k: int = 4
    search_kwargs: dict = {}

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        docs = []
        for h in self.index.search(query, k=self.k, **self.search_kwargs):
            c = h.chunk
            meta = {"source": c.path, "page": c.page, "heading": c.heading, "start_index": c.start,
                    "end_index": c.end, "chunk_id": c.id, "kind": c.kind, "score": h.score, "scores": h.scores}
            docs.append(Document(page_content=c.text, metadata=meta, id=str(c.id)))
        return docs


def as_langchain_retriever(index, k: int = 4, **search_kwargs) -> IndexRetriever:
    """`index`: a `rag.Index` or a path to one; `search_kwargs` go to `Index.search` (mode, fusion, ...)."""
    if not hasattr(index, "search"):
        from .index import Index
        index = Index.open(index)
    return IndexRetriever(index=index, k=k, search_kwargs=search_kwargs)
