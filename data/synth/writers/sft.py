"""Instructions (`sft.jsonl`): closed-book questions on training facts, context QA (including "not in
the passage"), multi-turn conversations and descriptions, a share with system prompts.
Answers are the short answer string itself, so exact match works on the model's output."""
from __future__ import annotations

import random

from data.synth.items import (Passage, all_questions, ask_passage, assistant, context_prompt, document,
                              make_passage, user, with_system)
from data.synth.language import CONTEXT_FOLLOW_UP, DESCRIBE, GREETINGS
from data.synth.scales import Scale
from data.synth.world import LANGS, World


def closed_qa(world: World, scale: Scale, rng: random.Random) -> list[dict]:
    rows = []
    for e, a in world.train_facts:
        for lang in LANGS:
            for q in rng.sample(all_questions(e, a, lang), scale.qa_templates):
                rows.append(with_system([user(q), assistant(e.value(a, lang))], lang, rng))
    return rows


def context_qa(world: World, lang: str, rng: random.Random, parallel: float = 0.0) -> list[dict]:
    p = make_passage(world.context_train, lang, rng, parallel)
    ask = ask_passage(p, rng)
    return with_system([user(context_prompt(p, ask.question, rng)), assistant(ask.answer)], lang, rng)


def multi_turn(world: World, lang: str, rng: random.Random, parallel: float = 0.0) -> list[dict]:
    kind = rng.choice(("closed", "context", "greeting"))
    msgs: list[dict] = []
    if kind == "greeting":
        hello, reply = rng.choice(GREETINGS[lang])
        msgs += [user(hello), assistant(reply)]
    if kind == "context":
        p: Passage = make_passage(world.context_train, lang, rng, parallel)
        first, second = ask_passage(p, rng), ask_passage(p, rng)
        msgs += [user(context_prompt(p, first.question, rng)), assistant(first.answer)]
        msgs += [user(CONTEXT_FOLLOW_UP[lang].format(q=second.question)), assistant(second.answer)]
    else:
        facts = world.train_facts
        e, _ = rng.choice(facts)
        mine = [a for f, a in facts if f is e]
        for a in rng.sample(mine, min(len(mine), rng.randint(1 if kind == "greeting" else 2, 3))):
            msgs += [user(rng.choice(all_questions(e, a, lang))), assistant(e.value(a, lang))]
    return with_system(msgs, lang, rng)


def describe(world: World, lang: str, rng: random.Random) -> list[dict]:
    e = rng.choice(world.fully_trained)
    ask = rng.choice(DESCRIBE[lang]).format(n=e.name[lang])
    return with_system([user(ask), assistant(document(e, lang, rng))], lang, rng)


def one_draw(world: World, scale: Scale, rng: random.Random) -> list[list[dict]]:
    convs = closed_qa(world, scale, rng)
    for lang in LANGS:
        convs += [context_qa(world, lang, rng, scale.parallel_passages) for _ in range(scale.context_train)]
        convs += [multi_turn(world, lang, rng, scale.parallel_passages) for _ in range(scale.multi_turn)]
        if world.fully_trained:
            convs += [describe(world, lang, rng) for _ in range(scale.describe)]
    return convs


def write(world: World, scale: Scale, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(f"sft-{seed}")
    convs = [c for _ in range(scale.sft_draws) for c in one_draw(world, scale, rng)]
    return {"sft.jsonl": [{"conversations": c} for c in convs]}
