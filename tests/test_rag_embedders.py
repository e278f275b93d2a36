"""Embedders: the offline default (fit, save, reload), open_clip text+image towers, sentence-transformers."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from rag import HashedNgramLSA, Index, OpenClipEmbedder
from rag.embedders import embedder_from_spec

SHARED = Path(__file__).resolve().parents[2] / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"


def test_offline_default_fits_saves_and_reloads(tmp_path):
    texts = ["the cat sat on the mat", "dogs chase cats", "股票市场今天上涨", "the stock market rose today"] * 5
    e = HashedNgramLSA(dim=16, sketch_dim=8)
    e.fit(texts)
    v = e.embed_documents(texts[:4])
    assert v.shape == (4, 24) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ e.embed_query("a cat on a mat") > v[2] @ e.embed_query("a cat on a mat")
    e.save(tmp_path)
    back = embedder_from_spec(e.spec())
    back.load(tmp_path)
    np.testing.assert_allclose(back.embed_documents(texts[:4]), v, atol=1e-6)
    # Text unseen at fit time still embeds meaningfully (the count-sketch half).
    new = back.embed_documents(["zygomorphic orchids bloom", "quantum chromodynamics"])
    assert new[0] @ back.embed_query("zygomorphic orchids") > new[1] @ back.embed_query("zygomorphic orchids")


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "PNG")
    return buf.getvalue()


def test_open_clip_text_and_image_towers_in_one_index(tmp_path):
    pytest.importorskip("open_clip")
    try:
        clip = OpenClipEmbedder("minimind-clip-micro")  # registered by vlm.vision; random init, no download
    except Exception as e:  # the config comes from vlm/; without it there is no tiny model to test with
        pytest.skip(f"tiny open_clip config unavailable: {e}")
    imgs = clip.embed_images([_png("red"), _png("blue")])
    txt = clip.embed_documents(["a red square", "a blue square"])
    assert imgs.shape == txt.shape == (2, clip.dim)
    root = tmp_path / "docs"
    root.mkdir()
    (root / "red.png").write_bytes(_png("red"))
    (root / "notes.txt").write_text("A short note.")
    idx = Index(tmp_path / "idx", clip)
    idx.ingest.ocr = False
    report = idx.index_folder(root, progress=False)
    assert report["files"] == 2  # an image with no text is still indexed: the image tower embeds it
    image_chunk = next(c for c in idx.chunks.values() if c.kind == "image")
    np.testing.assert_allclose(idx.dense.vectors([image_chunk.id])[0], imgs[0], atol=1e-5)
    hits = Index.open(tmp_path / "idx").search("red", k=2, mode="dense")
    assert {h.chunk.path for h in hits} == {"red.png", "notes.txt"}


@pytest.mark.skipif(not MINILM.is_dir(), reason="../shared/models/all-MiniLM-L6-v2 not present")
def test_sentence_transformers_backend(tmp_path):
    from rag import SentenceTransformerEmbedder

    e = SentenceTransformerEmbedder(str(MINILM))
    v = e.embed_documents(["A man is eating food.", "The stock market crashed."])
    q = e.embed_query("Someone has a meal.")
    assert v.shape == (2, 384) and v[0] @ q > v[1] @ q
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.txt").write_text("A man is eating food.")
    (root / "b.txt").write_text("The stock market crashed.")
    Index(tmp_path / "idx", e).index_folder(root, progress=False)
    back = Index.open(tmp_path / "idx")  # the embedder is rebuilt from the manifest's path
    assert back.embedder.spec() == e.spec()
    assert back.search("Someone has a meal.", k=1, mode="dense")[0].chunk.path == "a.txt"
    with pytest.raises(ValueError, match="built with embedder"):
        Index.open(tmp_path / "idx", HashedNgramLSA())


@pytest.mark.skipif(not MINILM.is_dir(), reason="../shared/models/all-MiniLM-L6-v2 not present")
def test_sentence_transformers_fast_query_path_equals_encode():
    """embed_query's fast path (lean BERT forward, reused tokenizer) gives encode()'s vectors."""
    from rag import SentenceTransformerEmbedder
    from rag.embedders import _FastTextEncoder, l2_normalize

    e = SentenceTransformerEmbedder(str(MINILM), query_cache=0)
    assert e.fast_path == "bert-lean"
    texts = ["what is the capital of france?", "Someone has a meal.", "", "  padded   with  spaces  ",
             "two\nlines\tand a tab", "Ünïcödé naïve café, 東京 ☃ 🙂", "UPPER lower MiXeD 12345 $%&",
             "word " * 600]  # the last one is truncated at max_seq_length (256 tokens), as encode() does
    want = e.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    got = np.stack([e.embed_query(t) for t in texts])
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    one_by_one = np.stack([e.model.encode([t], normalize_embeddings=True, show_progress_bar=False)[0] for t in texts])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    # The generic path (HF model forward, used for non-BERT encoders) agrees too.
    generic = _FastTextEncoder(e.model, "hf-forward")
    np.testing.assert_allclose(l2_normalize(np.stack([generic(t) for t in texts])), want, atol=1e-5)
    # Without the fast path the embedder answers through encode(); same vectors.
    slow = SentenceTransformerEmbedder(str(MINILM), query_cache=0, fast_queries=False)
    assert slow.fast_path is None
    np.testing.assert_allclose(slow.embed_query(texts[0]), got[0], atol=1e-5)
    # A pipeline the fast path does not reproduce (here: a default prompt) keeps encode().
    prompts, default = e.model.prompts, e.model.default_prompt_name
    try:
        e.model.prompts, e.model.default_prompt_name = {"query": "query: "}, "query"
        assert _FastTextEncoder.build(e.model, "probe") is None
    finally:
        e.model.prompts, e.model.default_prompt_name = prompts, default


@pytest.mark.skipif(not MINILM.is_dir(), reason="../shared/models/all-MiniLM-L6-v2 not present")
def test_sentence_transformers_query_cache_is_bounded_and_returns_copies():
    from rag import SentenceTransformerEmbedder

    e = SentenceTransformerEmbedder(str(MINILM), query_cache=2)
    v = e.embed_query("first query")
    v[:] = 0  # callers may scribble on what they get back
    np.testing.assert_allclose(e.embed_query("first query"),
                               e.model.encode(["first query"], normalize_embeddings=True)[0], atol=1e-5)
    e.embed_query("second query")
    e.embed_query("third query")
    assert list(e._qcache) == ["second query", "third query"]
