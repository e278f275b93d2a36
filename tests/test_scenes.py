"""data.scenes: deterministic rendered scenes, bilingual captions and Q&A, held-out colour+shape pairs."""
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from data.scenes import (COLOURS, HELD_OUT_PAIRS, SCALES, SHAPES, caption, colourless_caption, hard_negative, questions, sample_scene,
                         swapped_binding,
                         write_scene_splits)

TYPES = {"colour", "shape", "size", "position", "count", "text", "chart", "caption"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    return out, write_scene_splits(out, seed=3, scale="micro")


def test_same_seed_same_bytes_other_seed_differs(micro, tmp_path):
    out, summary = micro
    again = write_scene_splits(tmp_path / "again", seed=3, scale="micro")
    assert again == summary
    for rel in ["clip_pretrain.jsonl", "vlm_pretrain.jsonl", "vlm_sft.jsonl", "eval/vqa.jsonl",
                "images/train/000000.png", "images/eval/000007.png"]:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    write_scene_splits(tmp_path / "other", seed=4, scale="micro")
    assert (out / "vlm_sft.jsonl").read_bytes() != (tmp_path / "other" / "vlm_sft.jsonl").read_bytes()


def test_images_drawn_by_a_pool_of_processes_are_the_same_bytes(micro, tmp_path, monkeypatch):
    import data.scenes as scenes
    out, summary = micro
    monkeypatch.setattr(scenes, "PARALLEL_RENDER_MIN", 0)  # micro's 100-odd images through the pool too
    if scenes.usable_cores() < 2:
        pytest.skip("one core: the pool is never used")
    assert write_scene_splits(tmp_path / "pool", seed=3, scale="micro") == summary
    images = sorted(p.relative_to(out) for p in (out / "images").rglob("*.png"))
    assert len(images) > 100
    for rel in images:
        assert (out / rel).read_bytes() == (tmp_path / "pool" / rel).read_bytes(), rel


def test_text_only_scenes_write_the_same_texts_and_no_images(micro, tmp_path):
    out, summary = micro
    text_only = write_scene_splits(tmp_path / "text", seed=3, scale="micro", images=False)
    assert {k: v for k, v in text_only.items() if k != "images_rendered"} == \
        {k: v for k, v in summary.items() if k != "images_rendered"}
    assert not (tmp_path / "text" / "images").exists() and (out / "images" / "rendered.json").is_file()
    for rel in ["clip_pretrain.jsonl", "vlm_pretrain.jsonl", "vlm_sft.jsonl", "eval/vqa.jsonl", "eval/captions.jsonl"]:
        assert (out / rel).read_bytes() == (tmp_path / "text" / rel).read_bytes(), rel
    write_scene_splits(tmp_path / "text", seed=3, scale="micro")  # the pictures, later, for the same texts
    assert (out / "images/eval/000007.png").read_bytes() == (tmp_path / "text/images/eval/000007.png").read_bytes()


def test_files_follow_minimind_v_format(micro):
    out, summary = micro
    assert summary["train_images"] == 48 and summary["eval_images"] == 30
    for name in ["vlm_pretrain.jsonl", "vlm_sft.jsonl", "eval/vqa.jsonl"]:
        for row in _rows(out / name):
            user, assistant = row["conversations"]
            assert user["role"] == "user" and user["content"].startswith("<image>\n")
            assert assistant["role"] == "assistant" and assistant["content"]
            assert (out / "images" / row["image"]).is_file()
    sft = _rows(out / "vlm_sft.jsonl")
    assert {r["type"] for r in sft} <= TYPES and {r["lang"] for r in sft} == {"en", "zh"}
    vqa = _rows(out / "eval" / "vqa.jsonl")
    assert len(vqa) == 60 and {r["lang"] for r in vqa} == {"en", "zh"}
    for r in vqa:
        assert r["answer"] == r["conversations"][1]["content"] and r["type"] in TYPES
        assert isinstance(r["unseen_combo"], bool)
        assert len(r["answer"].split()) == 1 or r["type"] in ("colour", "shape", "position")  # keyed: "circle red"
        assert r["image"].startswith("eval/")
    assert any(r["unseen_combo"] for r in vqa) and not all(r["unseen_combo"] for r in vqa)
    # CLIP sees the train images and the caption-only `clip` images; the VLM stages only the former
    clip = _rows(out / "clip_pretrain.jsonl")
    assert summary["clip_only_images"] == 24 and len(clip) == 2 * (48 + 24) and all(r["caption"] for r in clip)
    assert {r["image"].split("/")[0] for r in clip} == {"train", "clip"}
    assert all((out / "images" / r["image"]).is_file() for r in clip)
    vlm_images = {r["image"] for name in ["vlm_pretrain.jsonl", "vlm_sft.jsonl"] for r in _rows(out / name)}
    assert all(i.startswith(("train/", "pairs/", "charts/")) for i in vlm_images)  # pairs, charts: SFT only
    assert summary["keyed_answers"] and summary["pair_images"] == 8 and summary["chart_images"] == 8


def test_training_never_shows_a_held_out_pair_but_eval_does(micro):
    out, _ = micro
    held = [f"{c} {s}" for c, s in HELD_OUT_PAIRS] + [f"{COLOURS[c][1]}{SHAPES[s][1]}" for c, s in HELD_OUT_PAIRS]
    train_text = (out / "clip_pretrain.jsonl").read_text(encoding="utf-8") + \
        (out / "vlm_sft.jsonl").read_text(encoding="utf-8") + (out / "vlm_pretrain.jsonl").read_text(encoding="utf-8")
    assert not any(h in train_text for h in held)
    captions = _rows(out / "eval" / "captions.jsonl")
    assert all(any(h in r["caption"] for h in held) == r["unseen_combo"] for r in captions)
    # Many more draws, no rendering: train scenes never contain a held-out pair, and every colour
    # and every shape still occurs in training.
    rng, seen = random.Random(0), set()
    for i in range(3000):
        scene = sample_scene(rng, "train", ["single", "pair", "count"][i % 3])
        pairs = {(o.colour, o.shape) for o in scene.objects}
        assert not pairs & HELD_OUT_PAIRS
        seen |= pairs
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


def test_answers_are_short_and_in_the_question_language():
    rng = random.Random(1)
    zh_words = {v[1] for v in COLOURS.values()} | {v[1] for v in SHAPES.values()} | {"大", "小", "左边", "右边", "上方", "下方", "中间"}
    for kind in ["single", "pair", "count", "text", "chart"]:
        scene = sample_scene(rng, "eval", kind)
        assert caption(scene, "en") and caption(scene, "zh")
        en, zh = questions(scene, rng, "en"), questions(scene, rng, "zh")
        assert [t for t, _, _ in en] == [t for t, _, _ in zh]
        for (_, _, a_en), (qtype, q_zh, a_zh) in zip(en, zh):
            assert any("\u4e00" <= ch <= "\u9fff" for ch in q_zh)
            if qtype in ("colour", "shape", "size", "position"):
                assert a_zh in zh_words and a_en.isascii()
            if qtype in ("count", "text"):
                assert a_zh == a_en


def test_unknown_scale_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown scene scale"):
        write_scene_splits(tmp_path, scale="huge")


def test_hard_negative_changes_one_attribute_and_never_names_a_held_out_pair():
    rng = random.Random(5)
    held = [f"{c} {s}" for c, s in HELD_OUT_PAIRS] + [f"{COLOURS[c][1]}{SHAPES[s][1]}" for c, s in HELD_OUT_PAIRS]
    changed = 0
    for i in range(400):
        scene = sample_scene(rng, "train", ["single", "pair", "count", "text", "chart"][i % 5])
        for lang in ("en", "zh"):
            text = caption(scene, lang)
            neg = hard_negative(text, rng)
            assert neg is not None and neg != text
            assert not any(h in neg for h in held)
            if lang == "en":  # one word (or quoted word) differs; articles still agree with their noun
                diff = [(a, b) for a, b in zip(text.split(), neg.split()) if a != b]
                changed += len(diff)
                assert len(text.split()) == len(neg.split()) and 1 <= len(diff) <= 2, (text, neg)
                assert " a o" not in f" {neg}" and " an r" not in f" {neg}"
    assert changed < 400 * 1.2  # article fixes aside, exactly one word changes
    assert hard_negative("a photo of a cat", rng) is None  # nothing to swap: no negative


def test_swapped_binding_exchanges_an_attribute_between_the_two_objects_only():
    rng = random.Random(7)
    held = [f"{c} {s}" for c, s in HELD_OUT_PAIRS] + [f"{COLOURS[c][1]}{SHAPES[s][1]}" for c, s in HELD_OUT_PAIRS]
    swapped = 0
    for _ in range(200):
        scene = sample_scene(rng, "train", "pair")
        for lang in ("en", "zh"):
            text = caption(scene, lang)
            neg = swapped_binding(text, rng)
            if neg is None:
                continue
            swapped += 1
            assert neg != text and sorted(neg) == sorted(text)  # the same characters, rearranged
            assert not any(h in neg for h in held)
            if lang == "en":  # both objects keep their slots: "a(n) COLOUR SHAPE on the POSITION and ..."
                first, second = neg.split(" and ")
                assert len(first.split()) == len(second.split()) == 6, neg
    assert swapped > 300  # nearly every pair caption has something to swap
    for kind in ("single", "count", "text", "chart"):  # one object (or none): nothing to swap
        scene = sample_scene(rng, "train", kind)
        assert swapped_binding(caption(scene, "en"), rng) is None and swapped_binding(caption(scene, "zh"), rng) is None
    neg = hard_negative("a red star on the left and a blue circle on the right", random.Random(0), swap_share=1.0)
    assert neg in ("a blue star on the left and a red circle on the right",
                   "a red circle on the left and a blue star on the right",
                   "a red star on the right and a blue circle on the left")


def test_colourless_caption_drops_every_colour_word_but_keeps_the_rest():
    rng = random.Random(6)
    colour_words = list(COLOURS) + [v[1] for v in COLOURS.values()]
    for i in range(200):
        scene = sample_scene(rng, "train", ["single", "pair", "count", "text", "chart"][i % 5])
        for lang in ("en", "zh"):
            text, grey = caption(scene, lang), colourless_caption(caption(scene, lang))
            if scene.kind == "chart":
                assert grey is None
                continue
            assert not any(w in grey for w in colour_words)
            assert all(SHAPES[o.shape][lang == "zh"] in grey or o.shape in grey for o in scene.objects)
    assert colourless_caption("an orange diamond at the top and a red circle at the bottom") == \
        "a diamond at the top and a circle at the bottom"
    assert colourless_caption('the word "cat"') == 'the word "cat"'


def test_training_questions_cover_counting_and_reading_about_as_often_as_colour(tmp_path):
    """tiny's train split leans to count and text scenes: they bring 2 questions each, a single shape 8."""
    from collections import Counter

    write_scene_splits(tmp_path, seed=1, scale="tiny", images=False)
    per_type = Counter(r["type"] for r in _rows(tmp_path / "vlm_sft.jsonl") if not r["image"].startswith("pairs/"))
    assert per_type["text"] >= 0.75 * per_type["colour"] and per_type["count"] >= 0.75 * per_type["colour"]
    # the held-out questions keep the old mix, so VQA figures stay comparable across versions
    eval_types = Counter(r["type"] for r in _rows(tmp_path / "eval" / "vqa.jsonl"))
    assert eval_types["count"] == 120 and eval_types["text"] == 90


def test_question_only_sft_images_add_rows_after_the_train_rows_and_change_nothing_else(micro, tmp_path, monkeypatch):
    out = tmp_path / "none"
    write_scene_splits(out, seed=3, scale="micro", pair_images=0, chart_images=0)
    monkeypatch.setitem(SCALES, "micro", {**SCALES["micro"], "sft": 20})
    more = write_scene_splits(tmp_path / "more", seed=3, scale="micro", pair_images=0, chart_images=0)
    for rel in ["clip_pretrain.jsonl", "vlm_pretrain.jsonl", "eval/vqa.jsonl", "eval/captions.jsonl",
                "images/train/000000.png"]:  # what the tokenizer, CLIP and VLM pretraining read stays the same
        assert (out / rel).read_bytes() == (tmp_path / "more" / rel).read_bytes(), rel
    before, after = _rows(out / "vlm_sft.jsonl"), _rows(tmp_path / "more" / "vlm_sft.jsonl")
    assert after[:len(before)] == before  # the head of the file, what the tokenizer reads, is unchanged
    extra = after[len(before):]
    assert more["sft_only_images"] == 20 and len({r["image"] for r in extra}) == 20
    assert all(r["image"].startswith("sft/") and (tmp_path / "more" / "images" / r["image"]).is_file() for r in extra)
    assert {r["type"] for r in extra} >= {"colour", "shape", "count", "text"}
    assert not any(r["image"].startswith("sft/") for r in _rows(tmp_path / "more" / "clip_pretrain.jsonl"))


def test_a_question_that_names_one_of_two_objects_is_answered_key_first():
    """Keyed answers put the asked object's key where the answer is predicted (docs/experiments.md)."""
    scene = sample_scene(random.Random(5), "train", "pair")
    for o in scene.objects:
        other = next(x for x in scene.objects if x is not o)
        en = {t: (q, a) for t, q, a in questions(scene, random.Random(0), "en", about=o, keyed=True)}
        zh = {t: (q, a) for t, q, a in questions(scene, random.Random(0), "zh", about=o, keyed=True)}
        plain = {t: a for t, _, a in questions(scene, random.Random(0), "en", about=o)}
        assert plain == {"colour": o.colour, "shape": o.shape, "position": o.position}  # the default
        assert en["colour"] == (f"What colour is the {o.shape}?", f"{o.shape} {o.colour}")
        assert en["shape"][1] == f"{o.position} {o.shape}" and o.position in en["shape"][0]
        assert en["position"] == (f"Where is the {o.colour} {o.shape}?", f"{o.colour} {o.shape} {o.position}")
        assert zh["colour"][1] == SHAPES[o.shape][1] + COLOURS[o.colour][1]
        assert other.colour not in en["colour"][1] and COLOURS[other.colour][1] not in zh["colour"][1]


def test_the_old_plain_scenes_are_one_flag_away(tmp_path):
    """keyed=False, pair_images=0, chart_images=0 override the scale: one-word answers, no extra scenes."""
    summary = write_scene_splits(tmp_path, seed=3, scale="micro", images=False, keyed=False, pair_images=0,
                                 chart_images=0)
    assert not summary["keyed_answers"] and summary["pair_images"] == summary["chart_images"] == 0
    for name in ["vlm_sft.jsonl", "eval/vqa.jsonl"]:
        rows = _rows(tmp_path / name)
        assert not any(r["image"].startswith(("pairs/", "charts/")) for r in rows)
        assert all(len(r["conversations"][1]["content"].split()) == 1 for r in rows if r["type"] != "caption")


def test_pair_images_ask_about_both_objects_after_every_other_row(micro, tmp_path):
    out = tmp_path / "none"
    write_scene_splits(out, seed=3, scale="micro", pair_images=0, chart_images=0)
    more = write_scene_splits(tmp_path / "more", seed=3, scale="micro", pair_images=5, chart_images=0)
    for rel in ["clip_pretrain.jsonl", "vlm_pretrain.jsonl", "eval/vqa.jsonl", "images/train/000000.png"]:
        assert (out / rel).read_bytes() == (tmp_path / "more" / rel).read_bytes(), rel
    before, after = _rows(out / "vlm_sft.jsonl"), _rows(tmp_path / "more" / "vlm_sft.jsonl")
    assert after[:len(before)] == before
    extra = after[len(before):]
    assert more["pair_images"] == 5 and len(extra) == 5 * 2 * 3 * 2  # objects x types x languages
    for image in {r["image"] for r in extra}:
        assert image.startswith("pairs/") and (tmp_path / "more" / "images" / image).is_file()
        colour_answers = {r["conversations"][1]["content"] for r in extra if r["image"] == image
                          and r["type"] == "colour" and r["lang"] == "en"}
        assert len(colour_answers) == 2  # one per object
    assert not any(r["image"].startswith("pairs/") for r in _rows(tmp_path / "more" / "clip_pretrain.jsonl"))


def test_chart_images_ask_for_the_tallest_and_the_shortest_bar_after_every_other_row(micro, tmp_path):
    out = tmp_path / "none"
    write_scene_splits(out, seed=3, scale="micro", chart_images=0)
    more = write_scene_splits(tmp_path / "more", seed=3, scale="micro", chart_images=4)
    for rel in ["clip_pretrain.jsonl", "vlm_pretrain.jsonl", "eval/vqa.jsonl", "images/train/000000.png"]:
        assert (out / rel).read_bytes() == (tmp_path / "more" / rel).read_bytes(), rel
    before, after = _rows(out / "vlm_sft.jsonl"), _rows(tmp_path / "more" / "vlm_sft.jsonl")
    assert after[:len(before)] == before  # pair rows and all before them unchanged
    extra = after[len(before):]
    assert more["chart_images"] == 4 and len(extra) == 4 * 2 * 2  # superlatives x languages
    for image in {r["image"] for r in extra}:
        assert image.startswith("charts/")
        picture = Image.open(tmp_path / "more" / "images" / image).convert("RGB")
        en = {r["conversations"][0]["content"].split("\n")[1]: r["conversations"][1]["content"]
              for r in extra if r["image"] == image and r["lang"] == "en"}
        tallest, shortest = en["Which bar is the tallest?"], en["Which bar is the shortest?"]
        tops = _bar_tops(picture)  # the answers name the bars drawn highest and lowest
        assert tops[tallest] == min(tops.values()) and tops[shortest] == max(tops.values())
    assert not any(r["image"].startswith("charts/") for r in _rows(tmp_path / "more" / "clip_pretrain.jsonl"))


def _bar_tops(picture) -> dict[str, int]:
    """The top pixel row of each colour's bar in a rendered chart."""
    pixels, tops = picture.load(), {}
    for name, (rgb, _) in COLOURS.items():
        rows = [y for y in range(picture.height) for x in range(picture.width)
                if sum(abs(a - b) for a, b in zip(pixels[x, y], rgb)) < 40]
        if len(rows) > 10:
            tops[name] = min(rows)
    return tops
