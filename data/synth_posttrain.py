"""Post-training data for the synthetic world: what LoRA, DPO, reasoning distillation and GRPO need.

`write_posttrain_splits(world_dir, seed, scale)` writes `world_dir/posttrain/`:

| file | format | used by |
| --- | --- | --- |
| `lora_train.jsonl` | SFT `{"conversations"}` | LoRA: facts of a *new* domain (an archipelago never seen in pretraining) |
| `lora_eval.jsonl` | `{"messages", "answer", "lang"}` | LoRA: the same facts asked with a held-out phrasing |
| `dpo_train.jsonl`, `dpo_eval.jsonl` | `{"chosen": [msgs], "rejected": [msgs]}` | DPO fallback: right vs wrong / looping answers to verifiable questions |
| `reason_train.jsonl` | SFT, answers as `<think>...</think><answer>...</answer>` | reasoning distillation |
| `reason_eval.jsonl`, `grpo_train.jsonl`, `grpo_eval.jsonl` | `{"messages", "answer", "lang", "kind"}` | verifiable questions (arithmetic, facts in a passage) |

Everything is bilingual (en/zh) and deterministic in `seed`. The new domain is built from the
world's own vocabulary (its syllables for names, its towns and products for values, see
`data.synth.world`): the base model knows every token of it, only the facts are new. (A domain
whose answers use tokens the base never produced cannot be learned by an adapter: with frozen,
untrained output embeddings those tokens stay unreachable.) The DPO stage prefers the world's own
`dpo.jsonl` pairs; the pairs here are its fallback for worlds without them.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from data.synth.names import NameMaker
from data.synth.world import PRODUCTS, TOWNS

SCALES = {  # islands (LoRA domain), reasoning traces, GRPO prompts, held-out items per file, DPO pairs
    "micro": dict(islands=8, reason=300, grpo=200, heldout=40, dpo=200),
    "tiny": dict(islands=16, reason=2000, grpo=1000, heldout=200, dpo=1500),
    "small": dict(islands=100, reason=20000, grpo=5000, heldout=500, dpo=10000),
}

_PEOPLE = [("Mira", "米拉"), ("Bren", "布伦"), ("Tova", "托娃"), ("Ilan", "伊兰"), ("Sade", "萨德"), ("Oren", "奥伦"),
           ("Kiva", "基娃"), ("Lume", "卢梅"), ("Dara", "达拉"), ("Pim", "皮姆")]
_ANIMALS = [("goats", "山羊"), ("hens", "母鸡"), ("cats", "猫"), ("horses", "马"), ("geese", "鹅")]

# LoRA questions: four phrasings train, the fifth is held out (the facts must be recalled, not copied).
# Every phrasing names the attribute, as a real paraphrase would.
LORA_TEMPLATES = {
    "export": {"en": ["What does the island of {x} export?", "Name the main export of {x}.",
                      "{x} island is known for exporting what?", "Tell me the export of {x}.",
                      "Which export is {x} famous for?"],
               "zh": ["{x}岛出口什么？", "说出{x}岛的主要出口品。", "{x}岛以出口什么闻名？", "告诉我{x}岛的出口品。",
                      "{x}岛最有名的出口品是什么？"]},
    "harbour": {"en": ["Which town is the harbour of {x}?", "Name the harbour town of {x}.",
                       "Where is the harbour of {x}?", "Tell me the harbour town of {x}.",
                       "On {x}, which town has the harbour?"],
                "zh": ["{x}岛的港口城镇是哪里？", "说出{x}岛的港口城镇。", "{x}岛的港口在哪里？", "告诉我{x}岛的港口城镇。",
                       "{x}岛上哪个城镇有港口？"]},
    "lighthouses": {"en": ["How many lighthouses stand on {x}?", "Count the lighthouses of {x}.",
                           "{x} island has how many lighthouses?", "Tell me the number of lighthouses on {x}.",
                           "What is the lighthouse count of {x}?"],
                    "zh": ["{x}岛上有几座灯塔？", "数一数{x}岛的灯塔。", "{x}岛有多少座灯塔？", "告诉我{x}岛上灯塔的数量。",
                           "{x}岛的灯塔数目是多少？"]},
}
SYSTEM = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。"}


def _chat(lang: str, question: str, answer: str) -> dict:
    return {"conversations": [{"role": "system", "content": SYSTEM[lang]}, {"role": "user", "content": question},
                              {"role": "assistant", "content": answer}]}


def _item(lang: str, question: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM[lang]}, {"role": "user", "content": question}],
            "answer": answer, "lang": lang, **extra}


# ---------------------------------------------------------------- LoRA: a new domain

def _world_names(world: Path) -> list[tuple[str, str]]:
    """Names already used by the world's entities (islands must not collide with them)."""
    path = world / "world.json"
    if not path.is_file():
        return []
    ents = json.loads(path.read_text(encoding="utf-8")).get("entities", [])
    return [(e["name"]["en"], e["name"]["zh"]) for e in ents if "name" in e]


def lora_domain(rng: random.Random, n_islands: int, reserved: list[tuple[str, str]] = ()) -> tuple[list[dict], list[dict]]:
    """Facts about invented islands: train conversations (4 phrasings) and held-out items (the 5th)."""
    names = NameMaker(rng, list(reserved) + TOWNS + PRODUCTS)
    train, heldout = [], []
    for _ in range(n_islands):
        name = names.make(2, 3)
        facts = {"export": rng.choice(PRODUCTS), "harbour": rng.choice(TOWNS),
                 "lighthouses": (str(rng.randint(2, 9)),) * 2}
        for attr, value in facts.items():
            for li, lang in enumerate(("en", "zh")):
                x, ans = name[li], value[li]
                *seen, unseen = LORA_TEMPLATES[attr][lang]
                train += [_chat(lang, t.format(x=x), ans) for t in seen]
                heldout.append(_item(lang, unseen.format(x=x), ans, kind=f"lora.{attr}"))
    rng.shuffle(train)
    return train, heldout


# ---------------------------------------------------------------- verifiable questions

def column_step(a: int, op: str, b: int) -> str:
    """`a op b` (both below 100, never negative) worked column by column from the units, the way
    school sums are: "18 + 17: 8 + 7 = 15, 1 + 1 + 1 = 3, so 35." Our tokenizer splits numbers into
    digits, so a direct "18 + 17 = 35" asks a tiny model to know 35's first digit before its last; in
    columns every step is a one-digit fact with an explicit carry or borrow."""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        carry = (a0 + b0) // 10
        return f"{a} + {b}: {a0} + {b0} = {a0 + b0}, {a1} + {b1} + {carry} = {a1 + b1 + carry}, so {a + b}."
    borrow = int(a0 < b0)
    top = a0 + 10 * borrow
    return f"{a} - {b}: {top} - {b0} = {top - b0}, {a1} - {b1} - {borrow} = {a1 - b1 - borrow}, so {a - b}."


def arithmetic(rng: random.Random, lang: str) -> tuple[str, str, str]:
    """(question, reasoning, answer): 2-3 small operands, + and -, never negative on the way; the
    reasoning works each operation in columns (`column_step`)."""
    terms = [rng.randint(1, 20)]
    steps, value = [], terms[0]
    for _ in range(rng.randint(1, 2)):
        op = rng.choice("+-") if value > 1 else "+"
        b = rng.randint(1, 20) if op == "+" else rng.randint(1, value)
        new = value + b if op == "+" else value - b
        steps.append(column_step(value, op, b))
        terms += [op, b]
        value = new
    expr = " ".join(map(str, terms))
    question = f"What is {expr}?" if lang == "en" else f"计算 {expr} 等于多少？"
    return question, " ".join(steps), str(value)


def passage_fact(rng: random.Random, lang: str) -> tuple[str, str, str]:
    """(question, reasoning, answer): a short passage about 3 people; ask where one lives or how many animals."""
    li = 0 if lang == "en" else 1
    people = rng.sample(_PEOPLE, 3)
    towns = rng.sample(TOWNS, 3)
    counts = [rng.randint(2, 9) for _ in people]
    animal = rng.choice(_ANIMALS)
    if lang == "en":
        sents = [f"{p[0]} lives in {t[0]} and keeps {c} {animal[0]}." for p, t, c in zip(people, towns, counts)]
    else:
        sents = [f"{p[1]}住在{t[1]}，养了{c}只{animal[1]}。" for p, t, c in zip(people, towns, counts)]
    passage = " ".join(sents) if lang == "en" else "".join(sents)
    k = rng.randrange(3)
    who = people[k][li]
    if rng.random() < 0.5:
        q = f"Where does {who} live?" if lang == "en" else f"{who}住在哪里？"
        ans = towns[k][li]
    else:
        q = f"How many {animal[0]} does {who} keep?" if lang == "en" else f"{who}养了几只{animal[1]}？"
        ans = str(counts[k])
    why = (f"The passage says: {sents[k]}" if lang == "en" else f"短文中说：{sents[k]}")
    head = "Passage: " if lang == "en" else "短文："
    sep = "\nQuestion: " if lang == "en" else "\n问题："
    return head + passage + sep + q, why, ans


_PASSAGE_EN = re.compile(r"(\w+) lives in (\w+) and keeps (\d+) \w+\.")
_PASSAGE_ZH = re.compile(r"([^：。，]+?)住在([^，]+)，养了(\d+)只[^。]+。")


def question_kind(question: str, kind: str) -> str:
    """The finer kind of a verifiable question: `arith.<n>op` (operations in the sum), or
    `passage.place` / `passage.count` (the attribute a passage question asks for)."""
    if kind == "arith":
        expr = question.split("?")[0].split("？")[0]
        return f"arith.{sum(expr.count(op) for op in '+-')}op"
    asks_place = "Where does" in question or "住在哪里" in question
    return f"passage.{'place' if asks_place else 'count'}"


def passage_options(question: str) -> list[str]:
    """The passage's values of the attribute a `passage_fact` question asks for (one per person, in
    order): what a model that finds the right sentence picks from, and a guess picks at random."""
    text = question.split("\n")[0]
    rows = (_PASSAGE_EN if text.startswith("Passage: ") else _PASSAGE_ZH).findall(text)
    if not rows:
        raise ValueError(f"not a passage_fact question: {question[:60]!r}")
    column = 1 if question_kind(question, "passage") == "passage.place" else 2
    return [r[column] for r in rows]


def reasoning_answer(reasoning: str, answer: str) -> str:
    """The target format of reasoning distillation and the format GRPO's reward checks."""
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def verifiable(rng: random.Random, n: int, taken: set[str] | None = None) -> list[dict]:
    """n items with question, worked reasoning and exact answer, half arithmetic, half passage facts.

    Questions are unique and never one of `taken` (which is updated): that is what keeps the held-out
    questions out of every training file.
    """
    taken = set() if taken is None else taken
    out = []
    while len(out) < n:
        lang = "en" if len(out) % 2 == 0 else "zh"
        kind = "arith" if rng.random() < 0.5 else "passage"
        q, why, ans = (arithmetic if kind == "arith" else passage_fact)(rng, lang)
        if q not in taken:
            taken.add(q)
            out.append({"lang": lang, "kind": kind, "question": q, "reasoning": why, "answer": ans})
    return out


# ---------------------------------------------------------------- DPO pairs

def _looping(answer: str) -> str:
    return " ".join([answer] * 4)


def dpo_pairs(rng: random.Random, items: list[dict]) -> list[dict]:
    """chosen: the right answer; rejected: a wrong answer of the same kind and language (2/3) or a
    runaway loop of the right one (1/3, the classic small-model failure)."""
    pools: dict[tuple[str, str], list[str]] = {}
    for v in items:
        pools.setdefault((v["kind"], v["lang"]), []).append(v["answer"])
    out = []
    for v in items:
        wrong = [a for a in pools[(v["kind"], v["lang"])] if a != v["answer"]]
        loop = rng.random() < 1 / 3 or not wrong
        bad = _looping(v["answer"]) if loop else rng.choice(wrong)
        prompt = _item(v["lang"], v["question"], v["answer"])["messages"]
        out.append({"chosen": prompt + [{"role": "assistant", "content": v["answer"]}],
                    "rejected": prompt + [{"role": "assistant", "content": bad}],
                    "kind": f"{v['kind']}.{'loop' if loop else 'wrong_value'}"})
    return out


# ---------------------------------------------------------------- writer

def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_posttrain_splits(world_dir: str | Path, seed: int = 42, scale: str = "tiny") -> dict[str, int]:
    """Write `world_dir/posttrain/*.jsonl` (see the module docstring); returns row counts per file."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    s = SCALES[scale]
    world = Path(world_dir)
    out = world / "posttrain"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"posttrain-{seed}")
    lora_train, lora_eval = lora_domain(rng, s["islands"], _world_names(world))
    # Disjoint generator streams: train and held-out questions never share a prompt.
    # Held-out questions are drawn first; no training file may reuse one of them (or each other's).
    taken: set[str] = set()
    held = verifiable(random.Random(f"heldout-{seed}"), 3 * s["heldout"], taken)
    reason_eval, grpo_eval, dpo_held = held[0::3], held[1::3], held[2::3]
    reason = verifiable(random.Random(f"reason-{seed}"), s["reason"], taken)
    grpo = verifiable(random.Random(f"grpo-{seed}"), s["grpo"], taken)
    dpo_train = dpo_pairs(rng, verifiable(random.Random(f"dpo-{seed}"), s["dpo"], taken))
    dpo_eval = dpo_pairs(rng, dpo_held)

    files = {
        "lora_train.jsonl": lora_train,
        "lora_eval.jsonl": lora_eval,
        "dpo_train.jsonl": dpo_train,
        "dpo_eval.jsonl": dpo_eval,
        "reason_train.jsonl": [_chat(v["lang"], v["question"], reasoning_answer(v["reasoning"], v["answer"]))
                               for v in reason],
        "reason_eval.jsonl": [_item(v["lang"], v["question"], v["answer"], kind=v["kind"]) for v in reason_eval],
        "grpo_train.jsonl": [_item(v["lang"], v["question"], v["answer"], kind=v["kind"]) for v in grpo],
        "grpo_eval.jsonl": [_item(v["lang"], v["question"], v["answer"], kind=v["kind"]) for v in grpo_eval],
    }
    for name, rows in files.items():
        _write(out / name, rows)
    counts = {name: len(rows) for name, rows in files.items()}
    (out / "manifest.json").write_text(json.dumps({"seed": seed, "scale": scale, "files": counts}, indent=2),
                                       encoding="utf-8")
    return counts
