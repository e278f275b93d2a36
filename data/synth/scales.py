"""How big each world is. `micro`: plumbing tests in seconds; `tiny`: what a ~2-5M parameter model
learns in ~10 CPU-minutes (few entities, short answers, many phrasings); `small`: a GPU-sized world."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    persons: int
    companies: int
    docs_per_entity: int  # pretrain documents per entity *per language*, each a fresh phrasing/order
    closed_eval_frac: float  # share of entities with one attribute whose question is held out
    context_names: tuple[int, int]  # fresh names for context QA (train pool, eval pool)
    context_train: int  # context-QA SFT items per language
    context_pretrain: int  # context-QA examples written as plain text into pretrain.jsonl, per language
    context_eval: int  # held-out context-QA items per language
    multi_turn: int  # multi-turn conversations per language
    describe: int  # "tell me about X" conversations per language
    dpo_train: int  # preference pairs per language
    dpo_eval: int
    lm_heldout: int  # held-out documents per language (perplexity)
    qa_templates: int = 2  # question phrasings per training fact and language (in SFT, and as pretrain text)
    # independent draws of the pretraining corpus (fresh phrasings, passages and QA groupings each time):
    # a pretrain run that would see the corpus k times sees k different versions of it instead
    pretrain_draws: int = 1
    sft_draws: int = 1  # the same for the instructions (fresh passages, phrasings and system prompts)
    # share of the pretrain and SFT passages where 2-3 names share the asked attribute (`items.parallel_passage`);
    # 0.5 on tiny (seed 42, 2026-12-06) cost the LM closed-QA EM 0.84 -> 0.52 and context-QA EM 0.86 -> 0.69
    parallel_passages: float = 0.0


SCALES: dict[str, Scale] = {
    "micro": Scale(persons=12, companies=4, docs_per_entity=2, closed_eval_frac=0.5, context_names=(20, 10),
                   context_train=20, context_pretrain=10, context_eval=10, multi_turn=5, describe=3, dpo_train=15, dpo_eval=5,
                   lm_heldout=5, qa_templates=1),
    "tiny": Scale(persons=100, companies=20, docs_per_entity=10, closed_eval_frac=0.5, context_names=(3000, 100),
                  context_train=2500, context_pretrain=1500, context_eval=100, multi_turn=200, describe=60, dpo_train=500, dpo_eval=50,
                  lm_heldout=100, pretrain_draws=11, sft_draws=3),
    "small": Scale(persons=1000, companies=200, docs_per_entity=12, closed_eval_frac=0.3, context_names=(3000, 500),
                   context_train=10000, context_pretrain=5000, context_eval=500, multi_turn=1500, describe=500, dpo_train=5000,
                   dpo_eval=250, lm_heldout=500),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; choose one of {sorted(SCALES)}")
    return SCALES[name]
