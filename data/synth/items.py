"""Renderings of world facts: documents, questions, passages and chat messages (shared by all writers)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

from data.synth.language import (CONTEXT_INSTRUCTION, CONTEXT_PROMPT, DOC_INTROS, NOT_IN_PASSAGE, QUESTIONS,
                                 SENTENCE_JOIN, STATEMENTS, SYSTEM_PROMPTS)
from data.synth.world import KINDS, Entity


def statement(e: Entity, attr: str, lang: str, rng: random.Random, value: str | None = None) -> str:
    tpl = rng.choice(STATEMENTS[e.kind][attr][lang])
    return tpl.format(n=e.name[lang], v=e.value(attr, lang) if value is None else value)


def document(e: Entity, lang: str, rng: random.Random) -> str:
    """All facts of one entity, in a random order, each in a random phrasing, maybe with an intro."""
    attrs = sorted(e.attrs)
    rng.shuffle(attrs)
    intro = rng.choice(DOC_INTROS[lang]).format(n=e.name[lang])
    sentences = ([intro] if intro else []) + [statement(e, a, lang, rng) for a in attrs]
    return SENTENCE_JOIN[lang].join(sentences)


def question(e: Entity, attr: str, lang: str, template: int) -> str:
    return QUESTIONS[e.kind][attr][lang][template].format(n=e.name[lang])


def all_questions(e: Entity, attr: str, lang: str) -> list[str]:
    return [t.format(n=e.name[lang]) for t in QUESTIONS[e.kind][attr][lang]]


def with_system(messages: list[dict], lang: str, rng: random.Random, p: float = 0.3) -> list[dict]:
    """Prefix a system prompt to a share of conversations (models must work with and without one)."""
    if rng.random() < p:
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])}] + messages
    return messages


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@dataclass
class Passage:
    """1-3 sentences about 1-2 fresh entities; values are drawn per passage, so they must be read."""
    lang: str
    facts: list[tuple[Entity, str, str]]  # (entity, attribute, value in `lang`)
    text: str

    def said(self, e: Entity, attr: str) -> str | None:
        return next((v for f, a, v in self.facts if f is e and a == attr), None)


def make_passage(pool: list[Entity], lang: str, rng: random.Random, parallel: float = 0.0) -> Passage:
    """A share `parallel` of the passages are `parallel_passage`s; the rest state 1-3 facts of 1-2
    entities, mostly of different attributes, so the question's attribute alone finds the sentence."""
    if parallel and rng.random() < parallel:
        return parallel_passage(pool, lang, rng)
    ents = rng.sample(pool, rng.choice((1, 1, 2)))
    n_sent = rng.randint(len(ents), 3)
    facts: list[tuple[Entity, str, str]] = []
    slots = [(e, a) for e in ents for a in KINDS[e.kind]]
    rng.shuffle(slots)
    chosen = [(e, rng.choice(list(KINDS[e.kind]))) for e in ents]  # every entity is mentioned
    chosen += [s for s in slots if s not in chosen][: n_sent - len(chosen)]
    for e, a in chosen:
        facts.append((e, a, rng.choice(KINDS[e.kind][a])[0 if lang == "en" else 1]))
    rng.shuffle(facts)
    text = SENTENCE_JOIN[lang].join(statement(e, a, lang, rng, v) for e, a, v in facts)
    return Passage(lang, facts, text)


def parallel_passage(pool: list[Entity], lang: str, rng: random.Random) -> Passage:
    """2-3 entities of one kind, each given the same 1-2 attributes with different values ("Mira's pet
    is a dog. Tova's pet is a cat."): only the name in the question says which sentence answers it.
    A model that never meets these learns to find a sentence by its attribute and never binds a name
    to its own sentence (tiny, 2026-12-06: passage lookups of the reasoning stage at chance, 0.32-0.43)."""
    first = rng.choice(pool)
    same_kind = [e for e in pool if e.kind == first.kind and e is not first]
    ents = [first, *rng.sample(same_kind, min(len(same_kind), rng.randint(1, 2)))]
    attrs = rng.sample(sorted(KINDS[first.kind]), rng.randint(1, 2))
    facts = []
    for a in attrs:
        options = KINDS[first.kind][a]
        values = rng.sample(options, len(ents)) if len(options) >= len(ents) else [rng.choice(options) for _ in ents]
        facts += [(e, a, v[0 if lang == "en" else 1]) for e, v in zip(ents, values)]
    rng.shuffle(facts)
    text = SENTENCE_JOIN[lang].join(statement(e, a, lang, rng, v) for e, a, v in facts)
    return Passage(lang, facts, text)


class Ask(NamedTuple):
    question: str
    answer: str
    type: str  # "context" or "context.not_in_passage"
    entity: Entity
    attr: str


def ask_passage(p: Passage, rng: random.Random, p_none: float = 0.25) -> Ask:
    """A question about the passage: answerable, or (p_none) about a fact it does not state."""
    ents = list({id(e): e for e, _, _ in p.facts}.values())
    unsaid = [(e, a) for e in ents for a in KINDS[e.kind] if p.said(e, a) is None]
    if unsaid and rng.random() < p_none:
        e, a = rng.choice(unsaid)
        return Ask(question(e, a, p.lang, rng.randrange(3)), NOT_IN_PASSAGE[p.lang], "context.not_in_passage", e, a)
    e, a, v = rng.choice(p.facts)
    return Ask(question(e, a, p.lang, rng.randrange(3)), v, "context", e, a)


def context_prompt(p: Passage, q: str, rng: random.Random) -> str:
    instruction = CONTEXT_INSTRUCTION[p.lang] if rng.random() < 0.3 else ""
    return instruction + CONTEXT_PROMPT[p.lang].format(p=p.text, q=q)
