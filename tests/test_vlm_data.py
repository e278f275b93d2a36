"""VLM data: minimind-v jsonl / parquet and LLaVA json loaders, labels, truncation, bad records."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data.datasets import IGNORE_INDEX
from data.vlm_datasets import (LlavaJson, MiniMindVJsonl, MiniMindVParquet, VLMDataset, encode_vlm_conversation,
                               group_by_image, open_source, vlm_collate)
from training.train_tokenizer import main as train_tokenizer
from vlm.feature_cache import FeatureCache
from vlm.tokenizer import IMAGE_ID, load_tokenizer
from vlm.vision import VisionEncoder

torch.set_num_threads(1)
N = 64  # minimind-clip-tiny


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = ["describe the image", "a red circle", "红色的圆形", "what colour is the star?", "blue"] * 20
    (root / "t.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                  encoding="utf-8")
    train_tokenizer(["--data", str(root), "--out", str(root / "tok"), "--vocab-size", "300"])
    return load_tokenizer(root / "tok")


@pytest.fixture(scope="module")
def encoder():
    return VisionEncoder.from_open_clip("minimind-clip-tiny")


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.fixture()
def world(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(png_bytes(i))
    rows = [
        {"conversations": chat("<image>\ndescribe the image", "a red circle"), "image": "0.png"},
        {"conversations": chat("<image> and <image>: what colour is the star?", "blue"), "image": "1.png, 2.png"},
        {"conversations": chat("what colour is the star?", "blue")},  # text-only
        {"conversations": chat("<image>", "x"), "image": "missing.png"},  # bad: missing image
        {"conversations": chat("<image>", "x"), "image": ["0.png", "1.png"]},  # bad: 1 marker, 2 images
        {"conversations": [{"role": "user", "content": "no answer"}]},  # bad: nothing to learn
    ]
    path = tmp_path / "vlm_sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n", encoding="utf-8")
    return path


def test_jsonl_records_multi_image_and_text_only(world, tokenizer, caplog):
    src = open_source(world)
    assert isinstance(src, MiniMindVJsonl)
    assert [len(src[i].images) for i in range(3)] == [1, 2, 0]
    ds = VLMDataset(src, tokenizer, N, 512, preprocess=VisionEncoder.from_open_clip("minimind-clip-tiny").preprocess)
    assert len(ds) == 3 and len(ds.skipped) == 4  # missing image, count mismatch, no assistant, bad JSON
    assert "missing.png" in caplog.text and "vlm_sft.jsonl:7" in caplog.text  # file:line named
    items = [ds[i] for i in range(3)]
    assert [int((it["input_ids"] == IMAGE_ID).sum()) for it in items] == [N, 2 * N, 0]
    assert [len(it.get("pixel_values", [])) for it in items] == [1, 2, 0]
    batch = vlm_collate(items)
    assert batch["pixel_values"].shape[0] == 3 and batch["input_ids"].shape == batch["labels"].shape


def test_labels_supervise_the_answer_only(world, tokenizer, encoder):
    ds = VLMDataset(open_source(world), tokenizer, N, 512, preprocess=encoder.preprocess)
    item = ds[1]
    targets = item["labels"][item["labels"] != -100]
    assert tokenizer.decode(targets) == "blue<|im_end|>"
    assert (item["labels"][item["input_ids"] == IMAGE_ID] == -100).all()


def test_truncation_never_cuts_an_image(tokenizer):
    msgs = chat("<image> first <image> second, what colour is the star?", "blue")
    full, kept = encode_vlm_conversation(tokenizer, msgs, N, 10_000)
    assert kept == range(2)
    # a window that would end inside the second image drops that image whole
    enc, kept = encode_vlm_conversation(tokenizer, msgs, N, len(full["input_ids"]) - 20)
    n_slots = int((enc["input_ids"] == IMAGE_ID).sum())
    assert n_slots % N == 0 and n_slots // N == len(kept)
    assert (enc["labels"] != -100).any()  # the answer survives (window slides to the last target)


def test_parquet_source_with_minimind_v_dummy_image(tmp_path, tokenizer, encoder):
    table = pa.table({
        "conversations": [json.dumps(chat("<image>\ndescribe the image", "a red circle")),
                           json.dumps(chat("what colour is the star?", "blue"))],  # text-only + dummy image
        "image_bytes": [png_bytes(0), png_bytes(9)],
    })
    path = tmp_path / "sft.parquet"
    pq.write_table(table, path)
    src = open_source(path)
    assert isinstance(src, MiniMindVParquet)
    assert len(src[0].images) == 1 and src[1].images == []
    cache = FeatureCache(tmp_path / "cache", encoder)
    ds = VLMDataset(src, tokenizer, N, 512, feature_cache=cache)
    assert ds[0]["image_features"].shape == (1, N, encoder.hidden_size) and len(ds[1]["image_features"]) == 0


def test_llava_json_source(tmp_path, tokenizer, encoder):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(1))
    rows = [{"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\ndescribe the image"},
                                                           {"from": "gpt", "value": "a red circle"}]},
            {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "blue"}]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    src = open_source(path, tmp_path / "imgs")
    assert isinstance(src, LlavaJson) and src[0].messages[0]["role"] == "user"
    ds = VLMDataset(src, tokenizer, N, 512, feature_cache=FeatureCache(tmp_path / "cache", encoder))
    assert len(ds) == 2 and int((ds[0]["input_ids"] == IMAGE_ID).sum()) == N


def test_cached_and_pixel_datasets_give_the_same_features(world, tokenizer, encoder, tmp_path):
    cached = VLMDataset(open_source(world), tokenizer, N, 512, feature_cache=FeatureCache(tmp_path / "c", encoder))
    pixels = VLMDataset(open_source(world), tokenizer, N, 512, preprocess=encoder.preprocess)
    a, b = cached[1], pixels[1]
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.allclose(a["image_features"].float(), encoder(b["pixel_values"]), rtol=2e-3, atol=2e-3)


def test_group_by_image_asks_every_question_once_with_one_image(tokenizer):
    kinds = ["colour", "shape", "count", "size"]
    rows = [{"conversations": chat(f"<image>\nq{i}", f"a{i}"), "image": f"{i % 3}.png", "type": kinds[i % 4]}
            for i in range(24)]
    other = {"conversations": chat("<image> and <image>: what colour is the star?", "blue"), "image": "1.png, 2.png"}
    grouped = group_by_image([*rows, other], turns=3)
    assert grouped[-1] is other  # several images: passed through unchanged
    merged = grouped[:-1]
    assert max(len(g["conversations"]) for g in merged) == 6 and len(merged) < len(rows)
    asked = {}
    for g in merged:
        turns = g["conversations"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert turns[0]["content"].startswith("<image>") and "".join(t["content"] for t in turns).count("<image>") == 1
        assert len(set(g["types"])) == len(g["types"])  # one question per type: no en/zh twin to copy from
        for q, a in zip(turns[::2], turns[1::2]):
            question = q["content"].replace("<image>", "").strip()
            assert a["content"] == "a" + question[1:] and int(question[1:]) % 3 == int(g["image"][0])
            asked[question] = asked.get(question, 0) + 1
    assert asked == {f"q{i}": 1 for i in range(24)}
    assert group_by_image(rows, turns=3) == merged  # deterministic

    enc, kept = encode_vlm_conversation(tokenizer, merged[0]["conversations"], N, 10_000)
    assert len(kept) == 1 and int((enc["input_ids"] == IMAGE_ID).sum()) == N
    # every assistant turn is supervised: one run of labels per answer
    supervised = (enc["labels"] != IGNORE_INDEX).long()
    runs = int(((supervised[1:] - supervised[:-1]) == 1).sum()) + int(supervised[0])
    assert runs == len(merged[0]["conversations"]) // 2


def test_group_by_image_keeps_an_answer_out_of_earlier_turns():
    rows = [{"conversations": chat("<image>\nWhat colour is the star?", "red"), "image": "0.png", "type": "colour"},
            {"conversations": chat("<image>\nWhat shape is shown?", "star"), "image": "0.png", "type": "shape"},
            {"conversations": chat("<image>\nIs the star small or large?", "small"), "image": "0.png", "type": "size"}]
    for seed in range(5):
        for g in group_by_image(rows, turns=3, seed=seed):
            turns = g["conversations"]
            for k in range(1, len(turns), 2):
                assert turns[k]["content"] not in " ".join(t["content"] for t in turns[:k - 1])
