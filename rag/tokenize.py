"""Retrieval tokens: jieba words for Chinese runs, lower-cased unicode words for everything else.

`str.split` (LangChain's BM25 default) and `\\w\\w+` regexes (bm25s, LlamaIndex) turn a whole Chinese
sentence into one token, so BM25 scores every Chinese document 0. We cut the text into runs of CJK
ideographs and runs of other word characters: CJK runs go through `jieba.cut_for_search` (words plus
their shorter dictionary sub-words, which helps recall when a question words things differently),
other runs become lower-cased words (NFKC-normalised, so full-width letters and digits match ASCII).
"""
from __future__ import annotations

import re
import unicodedata

TOKENIZER_ID = "cjk-jieba-search+lower-words/v1"  # stored in the manifest: a change means re-index

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_RUNS = re.compile(rf"([{_CJK}]+)|([^\W{_CJK}]+)")  # a CJK run, or a run of other word characters
_jieba = None


def _cut_cjk(run: str) -> list[str]:
    global _jieba
    if _jieba is None:  # import lazily: loading jieba's dictionary costs ~0.6 s, pure-English users skip it
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return [w for w in _jieba.cut_for_search(run) if w.strip()]


def tokenize(text: str) -> list[str]:
    """Tokens of `text` for BM25 (order kept, duplicates kept: term frequency matters)."""
    text = unicodedata.normalize("NFKC", text).lower()
    out: list[str] = []
    for m in _RUNS.finditer(text):
        if m.group(1):
            out.extend(_cut_cjk(m.group(1)))
        else:
            out.append(m.group(2))
    return out


def has_cjk(text: str) -> bool:
    return re.search(f"[{_CJK}]", text) is not None
