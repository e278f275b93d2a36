"""Pretraining text (`pretrain.jsonl`) and held-out documents for perplexity (`eval/lm_heldout.jsonl`).

Each entity is described `docs_per_entity` times per language, every time with a new attribute order
and new phrasings; training questions with their answers are mixed in as plain text ("mixed
training"), which is what makes facts retrievable by questions the model never saw (closed-book
eval). Held-out questions never appear here; their facts do, in the descriptions. Reading
comprehension is mixed in the same way: passages about training-pool names with a question and
its answer, so a small model meets the copy-from-context skill long before SFT.
The corpus is `pretrain_draws` independent draws of all this: a run that would read one corpus k
times reads k versions of it (tiny, seed 42: context-QA EM 0.795 -> 0.865 at the same steps).
"""
from __future__ import annotations

import random

from data.synth.items import all_questions, ask_passage, document, make_passage
from data.synth.language import CONTEXT_TEXT, QA_TEXT
from data.synth.scales import Scale
from data.synth.world import LANGS, World

QA_PER_DOC = 4


def one_draw(world: World, scale: Scale, rng: random.Random, ctx_rng: random.Random) -> list[str]:
    docs = [document(e, lang, rng) for e in world.entities for lang in LANGS for _ in range(scale.docs_per_entity)]
    for lang in LANGS:
        lines = [QA_TEXT[lang].format(q=q, a=e.value(a, lang)) for e, a in world.train_facts
                 for q in rng.sample(all_questions(e, a, lang), scale.qa_templates)]
        rng.shuffle(lines)
        docs += ["\n".join(lines[i:i + QA_PER_DOC]) for i in range(0, len(lines), QA_PER_DOC)]
    for lang in LANGS:
        for _ in range(scale.context_pretrain):
            p = make_passage(world.context_train, lang, ctx_rng, scale.parallel_passages)
            ask = ask_passage(p, ctx_rng)
            docs.append(CONTEXT_TEXT[lang].format(p=p.text, q=ask.question, a=ask.answer))
    return docs


def write(world: World, scale: Scale, seed: int) -> dict[str, list[dict]]:
    rng, ctx_rng = random.Random(f"pretrain-{seed}"), random.Random(f"pretrain-context-{seed}")
    docs = [d for _ in range(scale.pretrain_draws) for d in one_draw(world, scale, rng, ctx_rng)]

    seen = set(docs)
    held_rng = random.Random(f"lm-heldout-{seed}")
    heldout = []
    for lang in LANGS:
        for _ in range(scale.lm_heldout * 50):  # new phrasings exist in abundance; the cap only guards a loop
            if sum(1 for h in heldout if h["lang"] == lang) >= scale.lm_heldout:
                break
            text = document(held_rng.choice(world.entities), lang, held_rng)
            if text not in seen:
                seen.add(text)
                heldout.append({"text": text, "lang": lang})
    return {"pretrain.jsonl": [{"text": d} for d in docs], "eval/lm_heldout.jsonl": heldout}
