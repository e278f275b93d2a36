"""Held-out QA (`eval/closed_qa.jsonl`, `eval/context_qa.jsonl`): `{"messages", "answer", "lang", "type"}`.

Closed-book items ask the held-out (entity, attribute) facts: the fact is in pretraining text, the
question is nowhere in training. Context items use passages about entities from the eval name pool,
which no training file mentions.
"""
from __future__ import annotations

import random

from data.synth.items import ask_passage, context_prompt, make_passage, question, user, with_system
from data.synth.scales import Scale
from data.synth.world import LANGS, World


def write(world: World, scale: Scale, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(f"eval-{seed}")
    closed = []
    for e, a in world.eval_facts:
        for lang in LANGS:
            closed.append({"messages": with_system([user(question(e, a, lang, rng.randrange(3)))], lang, rng),
                           "answer": e.value(a, lang), "lang": lang, "type": f"closed.{a}",
                           "entity": e.id, "attribute": a})
    context, seen = [], set()
    for lang in LANGS:
        n = 0
        for _ in range(scale.context_eval * 20):
            if n >= scale.context_eval:
                break
            p = make_passage(world.context_eval, lang, rng)
            ask = ask_passage(p, rng)
            prompt = context_prompt(p, ask.question, rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            context.append({"messages": with_system([user(prompt)], lang, rng), "answer": ask.answer, "lang": lang,
                            "type": ask.type})
            n += 1
    return {"eval/closed_qa.jsonl": closed, "eval/context_qa.jsonl": context}
