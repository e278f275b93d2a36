"""Our sparse-matrix BM25 gives rank_bm25.BM25Okapi's scores and top-10 on the same tokens, incrementally."""
from __future__ import annotations

import random

import numpy as np
from rank_bm25 import BM25Okapi

from rag.bm25 import BM25
from rag.tokenize import tokenize


def random_corpus(n: int, seed: int = 0) -> tuple[list[list[str]], list[str]]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    # Zipf-like: some words sit in most documents, so negative idfs and the epsilon floor are exercised.
    docs = [[rng.choice(vocab[: rng.randint(3, 400)]) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    return docs, vocab


def top10(scores: np.ndarray) -> list[int]:
    return list(np.lexsort((np.arange(len(scores)), -scores))[:10])


def test_scores_and_top10_equal_rank_bm25():
    docs, vocab = random_corpus(1500)
    rng = random.Random(1)
    for k1, b, eps in [(1.5, 0.75, 0.25), (1.2, 0.5, 0.1), (2.0, 1.0, 0.0)]:
        ref = BM25Okapi(docs, k1=k1, b=b, epsilon=eps)
        ours = BM25(k1, b, eps)
        ours.add(range(1000, 1000 + len(docs)), docs)
        assert (ours.idf() < 0).sum() == 0 or eps == 0.0
        for _ in range(40):
            q = [rng.choice(vocab) for _ in range(rng.randint(1, 6))] + ["never-seen"]
            q += q[:1]  # a repeated query token counts twice, as in rank_bm25
            expected = ref.get_scores(q)
            np.testing.assert_allclose(ours.get_scores(q), expected, rtol=0, atol=1e-9)
            ids, scores = ours.search(q, 10)
            want = [i for i in top10(expected) if expected[i] != 0 or any(t in docs[i] for t in q)]
            assert list(ids - 1000) == want[: len(ids)]
            np.testing.assert_allclose(scores, expected[want[: len(ids)]], atol=1e-9)


def test_incremental_add_delete_equals_rebuild(tmp_path):
    docs, vocab = random_corpus(600, seed=3)
    ours = BM25()
    ours.add(range(300), docs[:300])
    ours.add(range(300, 600), docs[300:])
    gone = set(random.Random(2).sample(range(600), 250))
    assert ours.delete(sorted(gone) + [99999]) == 250
    keep = [i for i in range(600) if i not in gone]
    ref = BM25Okapi([docs[i] for i in keep])
    ours.save(tmp_path / "bm25")
    loaded = BM25.load(tmp_path / "bm25")
    assert list(loaded.ids) == keep
    for q in (["w1", "w2"], ["w5", "w300", "w5"], ["w399"]):
        np.testing.assert_allclose(loaded.get_scores(q), ref.get_scores(q), atol=1e-9)
        sub = loaded.scores_for(q, [keep[3], keep[7], 123456])
        np.testing.assert_allclose(sub, [ref.get_scores(q)[3], ref.get_scores(q)[7], 0.0], atol=1e-9)
    assert not list((tmp_path / "bm25").glob("*.pkl"))


def test_tokenizer_splits_chinese_and_lowercases():
    toks = tokenize("北京大学的学生 Hello, WORLD! ＡＢＣ")
    assert "北京大学" in toks and "学生" in toks
    assert toks[-3:] == ["hello", "world", "abc"]
    b = BM25()
    b.add([0, 1], [tokenize("熊猫喜欢吃竹子"), tokenize("老虎喜欢吃肉")])
    assert b.search(tokenize("竹子"), 2)[0].tolist() == [0]
