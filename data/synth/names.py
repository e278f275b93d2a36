"""Fictional bilingual names: an English spelling built from syllables and its Chinese transliteration.

Each syllable maps to one fixed Chinese character, so a name reads consistently in both languages
and tokenizes into a few reusable pieces (small vocabularies learn them quickly).
"""
from __future__ import annotations

import random

SYLLABLES = [
    ("ba", "巴"), ("de", "黛"), ("ko", "柯"), ("lin", "琳"), ("ma", "玛"), ("no", "诺"), ("pa", "帕"), ("ri", "莉"),
    ("se", "塞"), ("ta", "塔"), ("vo", "沃"), ("xi", "希"), ("yu", "宇"), ("zan", "赞"), ("bel", "贝"), ("cor", "科"),
    ("dun", "顿"), ("fen", "芬"), ("gal", "加"), ("hor", "霍"), ("ith", "伊"), ("kel", "凯"), ("lor", "珞"),
    ("mar", "马"), ("nim", "宁"), ("oda", "奥"), ("pim", "皮"), ("rus", "鲁"), ("tev", "特"), ("wil", "威"),
]


class NameMaker:
    """Hands out (en, zh) names, unique in both languages across everything made by one maker.

    No name is a substring of another (or of a reserved word such as a town), so "Nono" never hides
    inside "Nonoba": a name found in a text really is that entity, for the model and for the tests
    that check held-out names never occur in training files.
    """

    def __init__(self, rng: random.Random, reserved: list[tuple[str, str]] = ()):
        self.rng = rng
        # Per language: the names given out, and every substring of them (names are short, so cheap).
        self.names: dict[str, set[str]] = {"en": set(), "zh": set()}
        self.parts: dict[str, set[str]] = {"en": set(), "zh": set()}
        for en, zh in reserved:
            self._add(en.lower(), "en")
            self._add(zh, "zh")

    @staticmethod
    def _substrings(s: str) -> set[str]:
        return {s[i:j] for i in range(len(s)) for j in range(i + 1, len(s) + 1)}

    def _clashes(self, name: str, lang: str) -> bool:
        return name in self.parts[lang] or not self._substrings(name).isdisjoint(self.names[lang])

    def _add(self, name: str, lang: str) -> None:
        self.names[lang].add(name)
        self.parts[lang] |= self._substrings(name)

    def make(self, min_syl: int = 2, max_syl: int = 3) -> tuple[str, str]:
        for _ in range(10_000):
            parts = [self.rng.choice(SYLLABLES) for _ in range(self.rng.randint(min_syl, max_syl))]
            en = "".join(p[0] for p in parts).capitalize()
            zh = "".join(p[1] for p in parts)
            if not self._clashes(en.lower(), "en") and not self._clashes(zh, "zh"):
                self._add(en.lower(), "en")
                self._add(zh, "zh")
                return en, zh
        raise RuntimeError("name space exhausted: ask for fewer entities or longer names")
