"""data.scenes: deterministic rendered scenes, bilingual captions and Q&A, held-out colour+shape pairs."""
import json
import random
from pathlib import Path

import pytest

from data.scenes import COLOURS, HELD_OUT_PAIRS, SHAPES, caption, questions, sample_scene, write_scene_splits

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
        assert isinstance(r["unseen_combo"], bool) and len(r["answer"].split()) == 1
        assert r["image"].startswith("eval/")
    assert any(r["unseen_combo"] for r in vqa) and not all(r["unseen_combo"] for r in vqa)
    clip = _rows(out / "clip_pretrain.jsonl")
    assert len(clip) == 96 and all(r["caption"] and r["image"].startswith("train/") for r in clip)


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
