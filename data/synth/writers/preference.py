"""Preference pairs (`dpo.jsonl`, held-out `eval/dpo.jsonl`): `{"chosen": [msgs], "rejected": [msgs]}`.

chosen is the correct short answer; rejected is a wrong value of the same attribute, a rambling or
looping answer, a hallucinated value where the passage says nothing, or a false "not in the passage";
`kind` (e.g. `closed.wrong_value`, `context.hallucinated`) names which, for per-kind accuracy.
Training pairs ask training facts and training passages; held-out pairs ask held-out facts and
passages about eval-pool entities only.
"""
from __future__ import annotations

import random

from data.synth.items import ask_passage, assistant, context_prompt, make_passage, question, user, with_system
from data.synth.language import NOT_IN_PASSAGE, RAMBLE
from data.synth.scales import Scale
from data.synth.world import KINDS, LANGS, Entity, World


def wrong_value(kind: str, attr: str, lang: str, right: str, rng: random.Random) -> str:
    values = [v[0 if lang == "en" else 1] for v in KINDS[kind][attr]]
    return rng.choice([v for v in values if v != right])


def bad_answer(right: str, kind: str, attr: str, lang: str, rng: random.Random) -> tuple[str, str]:
    """(rejected answer, what is wrong with it)."""
    r = rng.random()
    if r < 0.5:
        return wrong_value(kind, attr, lang, right, rng), "wrong_value"
    if r < 0.75:
        return f"{RAMBLE[lang]} {right}", "ramble"
    return (" " if lang == "en" else "").join([right] * 6), "loop"  # the runaway loop small models fall into


def closed_pair(e: Entity, attr: str, lang: str, rng: random.Random) -> dict:
    prompt = with_system([user(question(e, attr, lang, rng.randrange(3)))], lang, rng)
    right = e.value(attr, lang)
    bad, why = bad_answer(right, e.kind, attr, lang, rng)
    return {"chosen": prompt + [assistant(right)], "rejected": prompt + [assistant(bad)], "kind": f"closed.{why}"}


def context_pair(pool: list[Entity], lang: str, rng: random.Random) -> dict:
    p = make_passage(pool, lang, rng)
    ask = ask_passage(p, rng)
    prompt = with_system([user(context_prompt(p, ask.question, rng))], lang, rng)
    if ask.type == "context.not_in_passage":  # hallucinating a value instead of admitting the passage is silent
        bad, why = rng.choice(KINDS[ask.entity.kind][ask.attr])[0 if lang == "en" else 1], "hallucinated"
    elif rng.random() < 0.4:
        bad, why = NOT_IN_PASSAGE[lang], "false_not_in_passage"
    else:
        bad, why = bad_answer(ask.answer, ask.entity.kind, ask.attr, lang, rng)
    return {"chosen": prompt + [assistant(ask.answer)], "rejected": prompt + [assistant(bad)], "kind": f"context.{why}"}


def pairs(facts: list[tuple[Entity, str]], pool: list[Entity], n: int, rng: random.Random) -> list[dict]:
    out = []
    for lang in LANGS:
        for _ in range(n):
            if facts and rng.random() < 0.6:
                e, a = rng.choice(facts)
                out.append(closed_pair(e, a, lang, rng))
            else:
                out.append(context_pair(pool, lang, rng))
    return out


def write(world: World, scale: Scale, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(f"dpo-{seed}")
    return {"dpo.jsonl": pairs(world.train_facts, world.context_train, scale.dpo_train, rng),
            "eval/dpo.jsonl": pairs(world.eval_facts, world.context_eval, scale.dpo_eval, rng)}
