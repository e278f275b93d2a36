"""Second-stage rerankers for `Index.search(..., reranker=...)`, and MMR for diversity.

- `CrossEncoderReranker`: a sentence-transformers CrossEncoder from a local path.
- `LMReranker`: query likelihood with our own MiniMind LM (UPR, Sachan et al. 2022): a passage is as
  good as log p(question | passage) is high. No extra model is needed beyond the one the app chats with.
- `mmr`: maximal marginal relevance over the dense vectors of the candidates.

A reranker's score is blended with the first stage's: `weight * minmax(rerank) + (1 - weight) *
minmax(retrieval)`. A weak reranker (a small LM) then adjusts the order instead of overriding a strong
retriever; weight 1.0 ranks by the reranker alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .fusion import minmax
from .index import Hit


def _blend(hits: Sequence[Hit], scores: np.ndarray, weight: float, name: str) -> list[Hit]:
    if not hits:
        return []
    first = np.array([h.score for h in hits])
    final = weight * minmax(scores) + (1 - weight) * minmax(first)
    for h, s, f in zip(hits, scores, final):
        h.scores[name] = float(s)
        h.score = float(f)
    order = np.lexsort((np.arange(len(hits)), -final))
    return [hits[i] for i in order]


class CrossEncoderReranker:
    def __init__(self, path: str, weight: float = 1.0, batch_size: int = 32, max_length: int = 512):
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(path), device="cpu", max_length=max_length)
        self.weight, self.batch_size = weight, batch_size

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return []
        scores = self.model.predict([(query, h.chunk.text) for h in hits], batch_size=self.batch_size,
                                    show_progress_bar=False)
        return _blend(hits, np.asarray(scores, np.float64).reshape(len(hits)), self.weight, "cross_encoder")


class LMReranker:
    """log p(question | passage) under a causal LM (our MiniMind through `vlm`'s public API)."""

    PROMPT = "{passage}\n\nPlease write a question based on this passage."

    def __init__(self, model, tokenizer, weight: float = 0.5, max_passage_tokens: int = 384, batch_size: int = 8):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.weight, self.max_passage_tokens, self.batch_size = weight, max_passage_tokens, batch_size

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "LMReranker":
        import vlm
        from vlm.tokenizer import load_tokenizer

        return cls(vlm.MiniMindForCausalLM.from_pretrained(str(path)), load_tokenizer(path), **kw)

    def _prefix(self, passage: str) -> list[int]:
        from vlm.tokenizer import render_chat

        ids = self.tokenizer(passage, add_special_tokens=False)["input_ids"][: self.max_passage_tokens]
        passage = self.tokenizer.decode(ids)
        text = render_chat([{"role": "user", "content": self.PROMPT.format(passage=passage)}], add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def scores(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """Sum of log-probabilities of the question's tokens after each passage's prompt."""
        import torch

        q_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        out = []
        for s in range(0, len(passages), self.batch_size):
            rows = [self._prefix(p) + q_ids for p in passages[s:s + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.zeros((len(rows), width), dtype=torch.long)  # right padding keeps RoPE positions
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for i, r in enumerate(rows):
                start = len(r) - len(q_ids)  # first question token
                tgt = torch.tensor(q_ids)
                out.append(float(logp[i, start - 1:len(r) - 1].gather(-1, tgt[:, None]).sum()))
        return np.array(out)

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return []
        return _blend(hits, self.scores(query, [h.chunk.text for h in hits]), self.weight, "lm")


def mmr(qvec: np.ndarray, hits: list[Hit], vectors: np.ndarray, k: int, lam: float = 0.7) -> list[Hit]:
    """Greedy maximal marginal relevance: lam * relevance - (1 - lam) * max similarity to those chosen.

    Relevance is the hit's current (fused / reranked) score, min-max scaled, so MMR diversifies the
    ranking the earlier stages produced instead of falling back to raw dense similarity.
    """
    if not hits:
        return []
    rel = minmax(np.array([h.score for h in hits]))
    sim = vectors @ vectors.T
    chosen: list[int] = []
    left = list(range(len(hits)))
    while left and len(chosen) < k:
        red = sim[np.ix_(left, chosen)].max(axis=1) if chosen else np.zeros(len(left))
        gain = lam * rel[left] - (1 - lam) * red
        best = left[int(np.argmax(gain))]
        chosen.append(best)
        left.remove(best)
    for j, i in enumerate(chosen):
        hits[i].scores["mmr_rank"] = j + 1
    return [hits[i] for i in chosen] + [hits[i] for i in left]
