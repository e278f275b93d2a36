"""data.synth: determinism, file formats, held-out disjointness, learnability prerequisites."""
import hashlib
import json
import re
from pathlib import Path

import pytest

from data.datasets import check_dpo, check_messages, check_pretrain, check_sft
from data.synth.__main__ import main as synth_main
from data.synth.language import NOT_IN_PASSAGE, QUESTIONS, STATEMENTS
from data.synth.scales import SCALES

TRAIN_FILES = ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl")
EVAL_FILES = ("eval/closed_qa.jsonl", "eval/context_qa.jsonl", "eval/dpo.jsonl", "eval/lm_heldout.jsonl")


def read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=["micro", "tiny"])
def world(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    synth_main(["--out", str(out), "--seed", "7", "--scale", request.param])
    return out


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        synth_main(["--out", str(out), "--seed", str(seed), "--scale", "micro"])
    assert digest(a) == digest(b)
    assert digest(a)["pretrain.jsonl"] != digest(c)["pretrain.jsonl"]


def test_manifest_counts_and_formats(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["seed"] == 7
    for rel in TRAIN_FILES + EVAL_FILES:
        assert manifest["files"][rel] == len(read(world / rel)) > 0, rel
    for rec in read(world / "pretrain.jsonl"):
        check_pretrain(rec)
    for rec in read(world / "sft.jsonl"):
        check_sft(rec)
    for rel in ("dpo.jsonl", "eval/dpo.jsonl"):
        for rec in read(world / rel):
            check_dpo(rec)
            assert rec["chosen"][:-1] == rec["rejected"][:-1] and rec["chosen"][-1] != rec["rejected"][-1]
    for rel in ("eval/closed_qa.jsonl", "eval/context_qa.jsonl"):
        items = read(world / rel)
        for it in items:
            assert it["messages"][-1]["role"] == "user" and it["lang"] in ("en", "zh")
            assert isinstance(it["answer"], str) and 0 < len(it["answer"]) <= 30 and it["type"]
            check_messages(it["messages"] + [{"role": "assistant", "content": it["answer"]}])
        assert {it["lang"] for it in items[:16]} == {"en", "zh"}  # a prefix (eval --limit) has both languages
    entities = json.loads((world / "world.json").read_text())["entities"]
    assert all(set(e["name"]) == {"en", "zh"} for e in entities)


def test_sft_covers_every_task(world):
    convs = [r["conversations"] for r in read(world / "sft.jsonl")]
    answers = [m["content"] for c in convs for m in c if m["role"] == "assistant"]
    users = [m["content"] for c in convs for m in c if m["role"] == "user"]
    assert NOT_IN_PASSAGE["en"] in answers and NOT_IN_PASSAGE["zh"] in answers
    assert any(u.startswith("Passage:") for u in users) and any(u.startswith("短文：") for u in users)
    assert any(sum(m["role"] == "assistant" for m in c) >= 2 for c in convs)  # multi-turn
    assert any(c[0]["role"] == "system" for c in convs) and any(c[0]["role"] != "system" for c in convs)
    assert any(re.search(r"[\u4e00-\u9fff]", a) for a in answers) and any(re.search(r"[a-z]", a) for a in answers)
    context = read(world / "eval/context_qa.jsonl")
    assert {it["type"] for it in context} == {"context", "context.not_in_passage"}


def _texts(world: Path, rel: str) -> list[str]:
    rows = read(world / rel)
    if rel == "pretrain.jsonl":
        return [r["text"] for r in rows]
    if rel == "sft.jsonl":
        return [m["content"] for r in rows for m in r["conversations"]]
    return [m["content"] for r in rows for side in ("chosen", "rejected") for m in r[side]]


def test_closed_book_questions_are_held_out_but_facts_are_learnable(world):
    info = json.loads((world / "world.json").read_text())
    ents = {e["id"]: e for e in info["entities"]}
    train_text = {rel: "\n".join(_texts(world, rel)) for rel in TRAIN_FILES}
    pretrain_docs = _texts(world, "pretrain.jsonl")
    items = read(world / "eval/closed_qa.jsonl")
    assert len(items) == 2 * len(info["heldout"]["closed_questions"])
    for it in items:
        e, attr, lang = ents[it["entity"]], it["attribute"], it["lang"]
        assert f"{e['id']}.{attr}" in info["heldout"]["closed_questions"]
        assert it["answer"] == e["attrs"][attr][lang]
        # No phrasing of this question about this entity occurs in any training file...
        for q in QUESTIONS[e["kind"]][attr][lang]:
            q = q.format(n=e["name"][lang])
            assert all(q not in text for text in train_text.values()), q
        # ...while the fact is stated in pretraining text, in several different phrasings.
        stated = {tpl for tpl in STATEMENTS[e["kind"]][attr][lang]
                  if any(tpl.format(n=e["name"][lang], v=it["answer"]) in d for d in pretrain_docs)}
        assert len(stated) >= (2 if "micro" not in str(world) else 1)


def test_context_eval_entities_and_passages_never_in_training(world):
    info = json.loads((world / "world.json").read_text())
    eval_names = info["heldout"]["context_eval_names"]
    train_text = "\n".join(t for rel in TRAIN_FILES for t in _texts(world, rel))
    for name in eval_names:
        assert name["en"] not in train_text and name["zh"] not in train_text, name
    items = read(world / "eval/context_qa.jsonl")
    for it in items:
        prompt = it["messages"][-1]["content"]
        assert any(n[it["lang"]] in prompt for n in eval_names)
        if it["type"] == "context":
            assert it["answer"] in prompt.split("\n")[-2]  # the answer is read from the passage
        else:
            assert it["answer"] == NOT_IN_PASSAGE[it["lang"]]
    heldout_docs = set(_texts_lm(world))
    assert heldout_docs.isdisjoint(_texts(world, "pretrain.jsonl"))


def _texts_lm(world: Path) -> list[str]:
    return [r["text"] for r in read(world / "eval/lm_heldout.jsonl")]


def test_tiny_is_small_enough_to_learn():
    s = SCALES["tiny"]
    assert 100 <= s.persons + s.companies <= 200
    # Every attribute value is short (exact match friendly).
    from data.synth.world import KINDS
    assert max(len(v[0]) for vals in KINDS.values() for vs in vals.values() for v in vs) <= 10


def test_loaders_read_the_world(tmp_path):
    from data.datasets import DPODataset, SFTDataset
    from training.train_tokenizer import iter_texts, train_tokenizer
    from vlm.tokenizer import load_tokenizer

    world = tmp_path / "micro"
    synth_main(["--out", str(world), "--scale", "micro"])
    tok_dir = train_tokenizer(iter_texts([world / f for f in TRAIN_FILES]), tmp_path / "tok", vocab_size=400)
    tok = load_tokenizer(tok_dir)
    sft = SFTDataset(world / "sft.jsonl", tok, 256)
    for i in range(len(sft)):
        assert (sft[i]["labels"] != -100).any()
    dpo = DPODataset(world / "dpo.jsonl", tok, 256)
    assert (dpo[0]["chosen_labels"] != -100).any()


def test_chinese_name_characters_never_occur_in_fixed_text():
    # Chinese has no spaces: a name character that also occurs in a template or a value could make
    # a name appear across a word boundary ("凯霍诺" + "平时" contains "诺平").
    from data.synth import language
    from data.synth.names import SYLLABLES
    from data.synth.world import KINDS

    fixed = json.dumps([getattr(language, k) for k in dir(language) if k.isupper()] + [KINDS], ensure_ascii=False)
    assert not {zh for _, zh in SYLLABLES} & set(fixed)


@pytest.mark.parametrize("part, field", [("pretrain", "pretrain_draws"), ("sft", "sft_draws")])
def test_draws_are_fresh_versions_of_the_corpus(part, field):
    from dataclasses import replace
    from importlib import import_module

    from data.synth.world import build_world

    writer = import_module(f"data.synth.writers.{part}")
    one = SCALES["micro"]
    world = build_world(5, "micro", one)
    single = writer.write(world, one, 5)[f"{part}.jsonl"]
    triple = writer.write(world, replace(one, **{field: 3}), 5)[f"{part}.jsonl"]
    assert len(triple) == 3 * len(single)
    assert triple[:len(single)] == single  # the first draw is the one-draw corpus
    texts = [json.dumps(d, ensure_ascii=False) for d in triple]
    draws = [set(texts[i * len(single):(i + 1) * len(single)]) for i in range(3)]
    # later draws are new phrasings and passages, not copies of the first
    assert len(draws[1] - draws[0]) > len(single) // 2 and len(draws[2] - draws[1]) > len(single) // 2


def test_parallel_passages_need_the_name_to_find_the_answer():
    import random

    from data.synth.items import ask_passage, make_passage, parallel_passage
    from data.synth.scales import get_scale
    from data.synth.world import build_world

    world = build_world(7, "tiny", get_scale("tiny"))
    rng = random.Random(0)
    for lang in ("en", "zh") * 20:
        p = parallel_passage(world.context_train, lang, rng)
        names = {e.name[lang] for e, _, _ in p.facts}
        attrs = {a for _, a, _ in p.facts}
        assert 2 <= len(names) <= 3 and 1 <= len(attrs) <= 2
        for a in attrs:  # every name is given every attribute, so the attribute alone finds no sentence
            stated = [(e.name[lang], v) for e, b, v in p.facts if b == a]
            assert {n for n, _ in stated} == names
        ask = ask_passage(p, rng, p_none=0.0)
        assert ask.answer == p.said(ask.entity, ask.attr) and ask.entity.name[lang] in ask.question
        assert all(v in p.text for _, _, v in p.facts)
    # the share is what the writers ask for; without one the passages (and the rng stream) are as before
    a, b = random.Random(5), random.Random(5)
    assert make_passage(world.context_train, "en", a).text == make_passage(world.context_train, "en", b, 0.0).text
    for _ in range(20):
        facts = make_passage(world.context_train, "en", rng, 1.0).facts
        assert len({a for _, a, _ in facts}) < len(facts)


def test_the_scale_share_of_parallel_passages_reaches_the_training_writers():
    from dataclasses import replace

    from data.synth.world import build_world
    from data.synth.writers import pretrain, sft

    def sentences_per_passage(scale) -> list[int]:
        world = build_world(7, "micro", scale)
        texts = [m["content"] for r in sft.write(world, scale, 7)["sft.jsonl"] for m in r["conversations"]]
        texts += [r["text"] for r in pretrain.write(world, scale, 7)["pretrain.jsonl"]]
        passages = [line for t in texts for line in t.split("\n") if line.startswith(("Passage:", "短文："))]
        assert passages
        return [p.count(". ") + 1 if p.startswith("Passage:") else p.count("。") for p in passages]

    micro = SCALES["micro"]
    assert micro.parallel_passages == 0.0
    assert min(sentences_per_passage(replace(micro, parallel_passages=1.0))) >= 2  # 2-3 names each
    assert min(sentences_per_passage(micro)) == 1
