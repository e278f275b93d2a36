"""Grounded answers: retrieve, number the sources in the prompt, stream the model's answer, cite.

`answer(question, index, model, tokenizer)` returns an `Answer` (text, citations, sources);
`answer(..., stream=True)` returns an `AnswerStream`: iterate it for text pieces as the model writes
them, then read `.answer`. The model is any causal LM with HF `generate` (our `vlm.MiniMindForCausalLM`)
and its tokenizer; the prompt is ChatML through `vlm.tokenizer.render_chat`.

Citations are the sources the answer names as [n]; each carries path, page, heading, character span
and chunk id, so the app can link to the passage and the agent can quote it. When the model cites
nothing, `citations` is empty and `sources` still lists what it was shown.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .index import Hit

SYSTEM = ("Answer the question using only the numbered sources below. Cite the sources you use like [1]. "
          "If the sources do not contain the answer, say that you do not know.")


@dataclass
class Answer:
    text: str
    citations: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)


def source_info(n: int, hit: Hit) -> dict:
    c = hit.chunk
    return {"n": n, "path": c.path, "page": c.page, "heading": c.heading, "start": c.start, "end": c.end,
            "chunk_id": c.id, "score": hit.score, "text": c.text}


def build_messages(question: str, hits: Sequence[Hit], max_source_chars: int = 1200) -> list[dict]:
    blocks = []
    for n, h in enumerate(hits, 1):
        c = h.chunk
        where = c.path + (f", page {c.page}" if c.page else "")
        blocks.append(f"[{n}] ({where})\n{c.text[:max_source_chars]}")
    user = "Sources:\n\n" + "\n\n".join(blocks) + f"\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def cite(text: str, sources: list[dict]) -> list[dict]:
    """Sources named as [n] in `text`, in order of first mention."""
    nums = dict.fromkeys(int(m) for m in re.findall(r"\[(\d+)\]", text))
    return [{k: v for k, v in sources[n - 1].items() if k != "text"} for n in nums if 1 <= n <= len(sources)]


class AnswerStream:
    """Iterate for text pieces; `.answer` is filled in when the iteration ends."""

    def __init__(self, pieces: Iterator[str], sources: list[dict]):
        self._pieces, self.sources = pieces, sources
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        text = []
        for piece in self._pieces:
            text.append(piece)
            yield piece
        full = "".join(text).strip()
        self.answer = Answer(full, cite(full, self.sources), self.sources)


def _prompt_ids(model, tokenizer, messages: list[dict], max_new_tokens: int) -> list[int]:
    from vlm.tokenizer import render_chat

    ids = tokenizer(render_chat(messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt of {len(ids)} tokens + {max_new_tokens} new exceeds the model's {limit} positions")
    return ids


def _generate(model, tokenizer, ids: list[int], max_new_tokens: int) -> Iterator[str]:
    import torch
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kw = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
              max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    errors = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**kw)
        except Exception as e:  # re-raised in the consumer's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def answer(question: str, index=None, model=None, tokenizer=None, hits: Sequence[Hit] | None = None, k: int = 4,
           stream: bool = False, max_new_tokens: int = 256, max_source_chars: int = 1200,
           min_sources: int = 1, **search_kw) -> Answer | AnswerStream:
    """Retrieve `k` chunks from `index` (or use `hits`), prompt `model` with them, return/stream the answer.

    Sources are dropped from the end (then shortened) until the prompt fits the model's context.
    """
    if model is None or tokenizer is None:
        raise ValueError("rag.answer needs a model and its tokenizer (e.g. vlm.MiniMindForCausalLM + load_tokenizer)")
    if hits is None:
        if index is None:
            raise ValueError("rag.answer needs an index or hits")
        hits = index.search(question, k=k, **search_kw)
    hits = list(hits)[:k]
    while True:
        messages = build_messages(question, hits, max_source_chars)
        try:
            ids = _prompt_ids(model, tokenizer, messages, max_new_tokens)
            break
        except ValueError:
            if len(hits) > min_sources:
                hits = hits[:-1]
            elif max_source_chars > 100:
                max_source_chars //= 2
            else:
                raise
    sources = [source_info(n, h) for n, h in enumerate(hits, 1)]
    result = AnswerStream(_generate(model, tokenizer, ids, max_new_tokens), sources)
    if stream:
        return result
    for _ in result:
        pass
    return result.answer
