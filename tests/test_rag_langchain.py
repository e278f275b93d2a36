"""Our index as a LangChain BaseRetriever inside an LCEL chain."""
from __future__ import annotations

from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from rag import Index, as_langchain_retriever


def test_retriever_in_lcel_chain(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "mars.md").write_text("# Mars\n\nMars has two moons, Phobos and Deimos.")
    (root / "venus.md").write_text("# Venus\n\nVenus has no moons and a thick atmosphere.")
    Index(tmp_path / "idx").index_folder(root, progress=False)

    retriever = as_langchain_retriever(tmp_path / "idx", k=1, mode="hybrid")
    assert isinstance(retriever, BaseRetriever)
    docs = retriever.invoke("moons of Mars")
    assert isinstance(docs[0], Document) and docs[0].metadata["source"] == "mars.md"
    assert docs[0].metadata["heading"] == "Mars" and docs[0].metadata["end_index"] > 0

    def fmt(docs):
        return "\n".join(f"[{d.metadata['source']}] {d.page_content}" for d in docs)

    chain = {"context": retriever | RunnableLambda(fmt), "question": RunnablePassthrough()} | RunnableLambda(
        lambda x: f"Context:\n{x['context']}\nQ: {x['question']}")
    out = chain.invoke("Which planet has a thick atmosphere?")
    assert "[venus.md]" in out and out.endswith("Q: Which planet has a thick atmosphere?")
    assert len(retriever.batch(["Phobos", "atmosphere"])) == 2
