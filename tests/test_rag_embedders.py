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
