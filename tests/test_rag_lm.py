"""LM parts with a tiny random MiniMind: query-likelihood reranker, grounded (streaming) answers, citations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rag import Index, answer
from rag.answer import Answer, build_messages, cite
from rag.chunking import Chunk
from rag.rerank import LMReranker

vlm = pytest.importorskip("vlm")
if not hasattr(vlm, "MiniMindForCausalLM"):
    pytest.skip("vlm.MiniMindForCausalLM not available yet", allow_module_level=True)

TEXTS = ["Cats eat fish and mice.", "Dogs bark at night.", "Paris is the capital of France.",
         "Rain falls from clouds."]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from training.train_tokenizer import train_tokenizer
    from vlm.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS * 10 + ["Answer the question using the sources [1] [2]."] * 5, d, vocab_size=400)
    tok = load_tokenizer(d)
    cfg = vlm.MiniMindConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return vlm.MiniMindForCausalLM(cfg).eval(), tok


@pytest.fixture
def index(tmp_path):
    idx = Index(tmp_path / "idx")
    idx.add_sources([(f"d{i}.txt", "", [Chunk(t, f"d{i}.txt", page=i + 1, end=len(t))], [None])
                     for i, t in enumerate(TEXTS)])
    return idx


def test_lm_reranker_scores_are_question_log_likelihoods(lm, index):
    model, tok = lm
    r = LMReranker(model, tok, weight=1.0)
    passages = [TEXTS[0], TEXTS[2]]
    scores = r.scores("What do cats eat?", passages)
    # Reference: one unbatched forward per passage, summing log p of the question tokens.
    q = tok("What do cats eat?", add_special_tokens=False)["input_ids"]
    for p, s in zip(passages, scores):
        ids = torch.tensor([r._prefix(p) + q])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        ref = sum(float(logp[len(ids[0]) - len(q) - 1 + i, t]) for i, t in enumerate(q))
        assert abs(ref - s) < 1e-3
    hits = index.search("What do cats eat?", k=4)
    reranked = r.rerank("What do cats eat?", hits)
    assert [h.scores["lm"] for h in reranked] == sorted((h.scores["lm"] for h in reranked), reverse=True)
    via_index = index.search("What do cats eat?", k=4, reranker=r)
    assert [h.chunk.id for h in via_index] == [h.chunk.id for h in reranked]


def test_answer_streams_and_cites(lm, index):
    model, tok = lm
    result = answer("What do cats eat?", index, model, tok, k=2, max_new_tokens=12)
    assert isinstance(result, Answer) and len(result.sources) == 2
    assert result.sources[0]["path"] == "d0.txt" and result.sources[0]["page"] == 1
    stream = answer("What do cats eat?", index, model, tok, k=2, max_new_tokens=12, stream=True)
    pieces = list(stream)
    assert "".join(pieces).strip() == stream.answer.text == result.text  # greedy: same text either way
    msgs = build_messages("Q?", index.search("cats", k=2))
    assert msgs[1]["content"].startswith("Sources:\n\n[1] (d0.txt, page 1)")
    cites = cite("Cats eat fish [1], see also [3] and [1] [9].", result.sources + [{**result.sources[0], "n": 3}])
    assert [c["n"] for c in cites] == [1, 3] and "text" not in cites[0]
    with pytest.raises(ValueError, match="model"):
        answer("x", index)


def test_answer_drops_sources_to_fit_context(lm, index):
    model, tok = lm
    small = type(model)(model.config.__class__(**{**model.config.to_dict(), "max_position_embeddings": 260}))
    small.load_state_dict(model.state_dict())
    out = answer("What do cats eat?", index, small.eval(), tok, k=4, max_new_tokens=8)
    assert 1 <= len(out.sources) < 4
    assert np.isfinite([s["score"] for s in out.sources]).all()
