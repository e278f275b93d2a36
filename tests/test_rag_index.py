"""Index, dense FAISS store, fusion and the CLI, on real files and real FAISS."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rag import Index
from rag.__main__ import main as cli
from rag.dense import DenseIndex
from rag.fusion import fuse, ranks, rrf


def test_dense_flat_and_hnsw_with_removal(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for threshold in (10_000, 100):  # flat, then HNSW (switches at 100 vectors)
        d = DenseIndex(16, hnsw_threshold=threshold)
        d.add(np.arange(300) + 7, vecs)
        assert d.kind == ("flat" if threshold > 300 else "hnsw")
        ids, scores = d.search(vecs[5], 3)
        assert ids[0] == 12 and abs(scores[0] - 1) < 1e-5
        d.remove([12, 13])
        assert 12 not in d.search(vecs[5], 10)[0] and len(d) == 298
        d.save(tmp_path / d.kind)
        back = DenseIndex.load(tmp_path / d.kind)
        assert back.kind == d.kind and 12 not in back.search(vecs[5], 10)[0]
        np.testing.assert_allclose(back.vectors([20]), vecs[13:14], atol=1e-6)
    d.remove(list(range(7, 100)))  # > 20% tombstones: rebuilt without them
    assert not d.tombstones and len(d) == 207


def test_fusion_math():
    cols = {"dense": np.array([0.9, 0.8, 0.1]), "bm25": np.array([0.0, 10.0, 5.0])}
    assert ranks(cols["bm25"]).tolist() == [3, 1, 2]
    np.testing.assert_allclose(rrf(cols, k=60), [1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62])
    w = fuse(cols, "weighted", {"dense": 0.7, "bm25": 0.3})
    np.testing.assert_allclose(w, [0.7, 0.7 * 0.875 + 0.3, 0.15])
    with pytest.raises(ValueError):
        fuse(cols, "nope")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "solar.md").write_text("# Solar\n\nSolar panels turn sunlight into electricity. " + "Photovoltaic cells glow. " * 30 + "\n\n## Cost\n\n"
                                   "Panel prices fell sharply over the last decade.", encoding="utf-8")
    (root / "tea.txt").write_text("绿茶起源于中国。乌龙茶是半发酵茶。", encoding="utf-8")
    (root / "rivers.txt").write_text("The Nile is a long river in Africa. " * 40, encoding="utf-8")
    return root


def test_index_persists_and_modes_agree(folder, tmp_path):
    idx = Index(tmp_path / "idx")
    report = idx.index_folder(folder, progress=False)
    assert report["files"] == 3 and report["chunks"] == len(idx) > 3  # rivers.txt spans several chunks
    for mode in ("bm25", "dense", "hybrid"):
        assert idx.search("乌龙茶", k=1, mode=mode)[0].chunk.path == "tea.txt"
    hit = idx.search("panel prices", k=1)[0]
    assert hit.chunk.heading == "Solar > Cost" and set(hit.scores) == {"dense", "bm25"}
    assert folder.joinpath("solar.md").read_text()[hit.chunk.start:hit.chunk.end] == hit.chunk.text
    rrf_hits = idx.search("panel prices", k=3, fusion="rrf")
    assert rrf_hits[0].chunk.path == "solar.md"
    back = Index.open(tmp_path / "idx")
    for q in ("nile river", "绿茶", "sunlight"):
        a, b = idx.search(q, k=3), back.search(q, k=3)
        assert [(h.chunk.id, round(h.score, 5)) for h in a] == [(h.chunk.id, round(h.score, 5)) for h in b]
    mmr_hits = back.search("nile river africa", k=3, mmr_lambda=0.3)
    assert len({h.chunk.path for h in mmr_hits}) > 1  # plain top-3 is three copies of the Nile text
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == [".lock", "CURRENT", "v000001"]
    assert not list((tmp_path / "idx").rglob("*.pkl"))
    with pytest.raises(ValueError, match="mode"):
        back.search("x", mode="sparse")
    assert all(back.search(blank, mode=mode) == [] for blank in ("", " \n") for mode in ("bm25", "dense", "hybrid"))


def test_cli_index_and_query(folder, tmp_path, capsys):
    assert cli(["index", str(folder), "--index", str(tmp_path / "i"), "--quiet", "--chunk-size", "200",
                "--chunk-overlap", "20"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files"] == 3 and summary["skipped"] == 0
    assert cli(["query", "green tea 绿茶", "--index", str(tmp_path / "i"), "-k", "2", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["path"] == "tea.txt" and lines[0]["rank"] == 1
    manifest = json.loads((tmp_path / "i" / "v000001" / "manifest.json").read_text())
    assert manifest["chunker"] == {"size": 200, "overlap": 20, "unit": "chars"}
    assert manifest["embedder"]["kind"] == "hashed-ngram-lsa" and manifest["format_version"] == 1
    with pytest.raises(FileNotFoundError, match="not an index"):
        Index.open(tmp_path / "missing")


def test_cli_names_a_missing_folder_or_index_in_one_line(tmp_path, capsys):
    for argv, what in ((["query", "tea", "--index", str(tmp_path / "missing")], "not an index"),
                       (["index", str(tmp_path / "no_docs"), "--index", str(tmp_path / "i")], "not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert what in err and str(tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "i").exists()  # a failed first index leaves nothing behind
    with pytest.raises(SystemExit):
        cli(["query", "  ", "--index", str(tmp_path / "missing")])
    assert "the query is empty" in capsys.readouterr().err
