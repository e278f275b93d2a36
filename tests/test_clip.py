"""Our open_clip configs, the CLIP checkpoint format, the contrastive loss and the pretrain_clip stage."""
import json

import open_clip
import pytest
import torch

from vlm.vision import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, VisionEncoder, load_clip, save_clip_checkpoint


def test_custom_configs_are_registered_and_build_offline():
    for name in ("minimind-clip-micro", "minimind-clip-tiny", "minimind-clip-small"):
        assert name in open_clip.list_models()
    model = open_clip.create_model("minimind-clip-micro")
    tokens = open_clip.get_tokenizer("minimind-clip-micro")(["a red circle", "红色圆形"])
    assert tokens.shape == (2, 64)
    image_features, text_features, scale = model(torch.randn(2, 3, 32, 32), tokens)[:3]
    assert image_features.shape == text_features.shape == (2, 64)


def test_checkpoint_loads_in_open_clip_three_ways(tmp_path):
    model, name, cfg, _ = load_clip("minimind-clip-micro", seed=5)
    with torch.no_grad():
        model.visual.proj.add_(0.5)  # "trained": differs from the seeded random init
    save_clip_checkpoint(model, name, cfg, tmp_path)
    meta = json.loads((tmp_path / CHECKPOINT_CONFIG).read_text())
    assert meta["model_name"] == name and meta["model_cfg"] == cfg
    expected = model.state_dict()
    by_dir = open_clip.create_model(f"local-dir:{tmp_path}")
    by_file = open_clip.create_model(name, pretrained=str(tmp_path / CHECKPOINT_WEIGHTS))
    for loaded in (by_dir, by_file):
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    encoder = VisionEncoder.from_open_clip(pretrained=str(tmp_path))
    assert encoder.model_name == name and encoder.num_patches == 16 and encoder.hidden_size == 64
    assert encoder.identity != VisionEncoder.from_open_clip(name).identity
    assert torch.equal(encoder.visual.proj, model.visual.proj)
    assert encoder.embed_texts(["a blue star"]).shape == (1, 64)


def test_unknown_model_and_bad_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip("no-such-clip")
    with pytest.raises(FileNotFoundError, match="not a CLIP checkpoint folder"):
        load_clip("local-dir:" + str(tmp_path))


class Fixed(torch.nn.Module):
    """Stands in for open_clip.CLIP in `clip_loss`: fixed features from both towers, scale 50."""

    def __init__(self, img, txt):
        super().__init__()
        self.img, self.txt = torch.nn.Parameter(img), torch.nn.Parameter(txt)
        self.logit_scale = torch.nn.Parameter(torch.tensor(50.0).log())

    def visual(self, images):  # a vision tower that returns its pooled features only
        return self.img

    def encode_text(self, texts):
        return self.txt


def test_clip_loss_counts_pairs_and_rewards_alignment():
    trainer = pytest.importorskip("training.trainer", reason="training.trainer not available yet")
    from training.pretrain_clip import clip_loss

    eye = torch.eye(4)
    aligned = clip_loss(Fixed(eye, eye), {"images": torch.zeros(4, 3, 8, 8), "texts": torch.zeros(4, 5)})
    shuffled = clip_loss(Fixed(eye, eye.roll(1, 0)), {"images": torch.zeros(4, 3, 8, 8), "texts": torch.zeros(4, 5)})
    assert isinstance(aligned, trainer.LossOutput) and aligned.count == 4
    assert aligned.loss_sum.item() < 0.01 < shuffled.loss_sum.item()
    assert aligned.metrics["batch_i2t_acc"] == 1.0 and shuffled.metrics["batch_i2t_acc"] == 0.0


def test_text_tower_on_the_trimmed_batch_equals_open_clips_full_context():
    from training.pretrain_clip import clip_loss
    from vlm.vision import encode_text_trimmed

    torch.manual_seed(0)
    model = load_clip("minimind-clip-tiny")[0].double()
    tok = open_clip.get_tokenizer("minimind-clip-tiny")
    texts = tok(["a red circle on the left", "左边有一个小的红色圆形，右边是蓝色正方形", 'the word "cat"'])
    assert texts.shape[1] == 64 and int(texts.ne(0).sum(1).max()) < 60  # padding that the trim drops
    full, trimmed = model.encode_text(texts), encode_text_trimmed(model, texts)
    assert torch.allclose(full, trimmed, atol=1e-10)
    # the stage's loss (trimmed text tower) equals open_clip's own forward, gradients included
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    ours = clip_loss(model, {"images": images, "texts": texts})
    ours.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    img, txt, scale = model(images, texts)[:3]
    logits = scale * img @ txt.T
    target = torch.arange(3)
    reference = 3 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    reference.backward()
    assert torch.allclose(ours.loss_sum, reference, atol=1e-10)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-9), name


def test_hard_negatives_compete_for_the_image_only():
    from training.pretrain_clip import clip_loss, make_collate

    eye, images = torch.eye(4), torch.zeros(2, 3, 8, 8)
    far = clip_loss(Fixed(eye[:2], eye), {"images": images, "texts": torch.zeros(4, 5)})
    near = clip_loss(Fixed(eye[:2], torch.cat([eye[:2], eye[:2]])), {"images": images, "texts": torch.zeros(4, 5)})
    assert far.count == near.count == 2  # negatives are no pairs of their own
    assert far.loss_sum.item() < 0.01 < near.loss_sum.item()  # a negative as close as the caption costs

    collate = make_collate(lambda texts: texts, hard_negatives=True)
    items = [{"image": torch.zeros(3, 8, 8), "caption": c} for c in ("a small red star in the center", "hello")]
    batch = collate(items)
    assert batch["texts"][:2] == ["a small red star in the center", "hello"] and len(batch["texts"]) == 3
    assert batch["texts"] == collate(items)["texts"]  # the same batch gets the same negatives


def test_box_weights_share_each_box_over_the_patches_it_covers():
    from training.pretrain_clip import box_weights

    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.75, 0.75], [0.5, 0.0, 1.0, 0.25]])
    weights = box_weights(boxes, (2, 2))  # patches row-major: top-left, top-right, bottom-left, bottom-right
    expected = torch.tensor([[0.5, 0, 0.5, 0], [1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 1, 0, 0]])
    assert torch.allclose(weights, expected)


def test_boxes_follow_open_clips_crop_and_pad():
    from training.pretrain_clip import box_after_preprocess

    wide = (200, 100)  # the shortest side is kept whole: the middle 100 columns are what the encoder sees
    assert box_after_preprocess((0.25, 0.0, 0.75, 1.0), wide, "shortest") == (0.0, 0.0, 1.0, 1.0)
    assert box_after_preprocess((0.0, 0.0, 0.25, 0.5), wide, "shortest") == (0.0, 0.0, 0.0, 0.5)  # cropped away
    assert box_after_preprocess((0.0, 0.0, 1.0, 1.0), wide, "longest") == (0.0, 0.25, 1.0, 0.75)  # padded above
    assert box_after_preprocess((0.1, 0.2, 0.3, 0.4), wide, "squash") == (0.1, 0.2, 0.3, 0.4)


class TwoObjects(torch.nn.Module):
    """A picture whose left half of a 2x2 patch grid holds feature A and right half feature B; the
    text tower maps caption id k to feature k (A = 0, B = 1)."""

    def __init__(self):
        super().__init__()
        self.feats = torch.nn.Parameter(torch.eye(2))
        self.logit_scale = torch.nn.Parameter(torch.tensor(50.0).log())
        outer = self

        class Visual(torch.nn.Module):
            grid_size, proj = (2, 2), torch.eye(2)

            def forward(self, images):
                a, b = outer.feats
                tokens = torch.stack([a, b, a, b])[None].expand(len(images), 4, 2)
                return tokens.mean(1), tokens

        self.visual = Visual()

    def encode_text(self, texts):
        return self.feats[texts[:, 0]]


def test_region_loss_asks_each_objects_patches_for_its_own_caption():
    from training.pretrain_clip import make_clip_loss

    batch = {"images": torch.zeros(1, 3, 8, 8), "texts": torch.tensor([[0]]),
             "region_boxes": torch.tensor([[0.0, 0.1, 0.45, 0.9], [0.55, 0.1, 1.0, 0.9]]),
             "region_image": torch.tensor([0, 0]), "region_texts": torch.tensor([[0], [1]])}
    right = make_clip_loss(1.0)(TwoObjects(), batch | {"region_target": torch.tensor([0, 1])})
    swapped = make_clip_loss(1.0)(TwoObjects(), batch | {"region_target": torch.tensor([1, 0])})
    assert right.metrics["region_acc"] == 1.0 and swapped.metrics["region_acc"] == 0.0
    assert right.metrics["region_loss"] < 1e-6 and swapped.metrics["region_loss"] > 10
    assert right.loss_sum < swapped.loss_sum
    off = make_clip_loss(0.0)(TwoObjects(), batch | {"region_target": torch.tensor([1, 0])})
    assert "region_loss" not in off.metrics and torch.allclose(off.loss_sum, right.loss_sum - right.metrics["region_loss"])


def test_collate_gathers_the_batchs_regions_with_their_distinct_captions():
    from training.pretrain_clip import make_collate

    collate = make_collate(lambda texts: list(texts))
    box = (0.1, 0.1, 0.4, 0.4)
    items = [{"image": torch.zeros(3, 8, 8), "caption": "a red star and a blue circle",
              "regions": [(box, "a red star"), (box, "a blue circle")]},
             {"image": torch.zeros(3, 8, 8), "caption": 'the word "cat"', "regions": []},
             {"image": torch.zeros(3, 8, 8), "caption": "a red star", "regions": [(box, "a red star")]}]
    batch = collate(items)
    assert batch["region_image"].tolist() == [0, 0, 2] and batch["region_boxes"].shape == (3, 4)
    assert [batch["region_texts"][k] for k in batch["region_target"]] == ["a red star", "a blue circle", "a red star"]
    assert len(batch["region_texts"]) == 2
    assert "region_boxes" not in collate(items[1:2])


def test_pretrain_clip_stage_end_to_end(tmp_path):
    pytest.importorskip("training.trainer", reason="training.trainer not available yet")
    from data.scenes import write_scene_splits
    from training.pretrain_clip import main

    write_scene_splits(tmp_path / "scenes", seed=0, scale="micro")
    out = tmp_path / "clip"
    summary = main(["--data", str(tmp_path / "scenes"), "--out", str(out), "--preset", "micro",
                    "--max-steps", "6", "--batch-size", "16", "--eval-n", "20", "--hard-negatives", "1",
                    "--swap-share", "0.5", "--grey-copies", "0.5", "--region-weight", "1"])
    assert (out / CHECKPOINT_WEIGHTS).is_file() and (out / "metrics.jsonl").is_file()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(0 <= row.get("region_acc", -1) <= 1 for row in logged)  # the scenes' regions reached the loss
    encoder = VisionEncoder.from_open_clip(pretrained=str(out))
    assert encoder.model_name == "minimind-clip-micro"
    assert encoder.identity != VisionEncoder.from_open_clip("minimind-clip-micro", seed=0).identity
    report = json.loads((out / "retrieval.json").read_text())
    assert report["en"]["n"] == 20 and 0 <= report["en"]["i2t_top1"] <= 1
    assert summary["retrieval"]["zh"]["n"] == 20


def test_patch_dropout_thins_the_training_forwards_only(tmp_path, monkeypatch):
    import training.pretrain_clip as stage
    from data.scenes import write_scene_splits
    from open_clip.transformer import PatchDropout

    kept = []  # tokens left after each forward's dropout: class token + the patches kept

    class RecordingDropout(PatchDropout):
        def forward(self, x):
            out = super().forward(x)
            kept.append((x.shape[1], out.shape[1], self.training))
            return out

    monkeypatch.setattr(stage, "PatchDropout", RecordingDropout)
    write_scene_splits(tmp_path / "scenes", seed=0, scale="micro")
    out = tmp_path / "clip"
    stage.main(["--data", str(tmp_path / "scenes"), "--out", str(out), "--preset", "micro", "--max-steps", "2",
                "--batch-size", "8", "--eval-n", "0", "--patch-dropout", "0.5"])
    # micro: 4x4 patches + the class token; half of the 16 patches dropped in every training step
    assert kept == [(17, 9, True)] * 2
    kept.clear()  # with an unmasked tail, the last half of 4 steps sees every patch
    stage.main(["--data", str(tmp_path / "scenes"), "--out", str(tmp_path / "tail"), "--preset", "micro",
                "--max-steps", "4", "--batch-size", "8", "--eval-n", "0", "--patch-dropout", "0.5",
                "--unmasked-tail", "0.5"])
    assert kept == [(17, 9, True)] * 2
    assert "patch_dropout" not in (out / "open_clip_config.json").read_text()
    encoder = VisionEncoder.from_open_clip(pretrained=str(out))
    assert encoder.num_patches == 16
    with pytest.raises(SystemExit, match="region"):
        stage.main(["--data", str(tmp_path / "scenes"), "--out", str(tmp_path / "x"), "--preset", "micro",
                    "--patch-dropout", "0.5", "--region-weight", "1"])
    with pytest.raises(SystemExit, match="needs --patch-dropout"):
        stage.main(["--data", str(tmp_path / "scenes"), "--out", str(tmp_path / "x"), "--preset", "micro",
                    "--unmasked-tail", "0.5"])


def test_grey_copies_are_grey_and_say_no_colour(tmp_path):
    from data.scenes import COLOURS, write_scene_splits
    from training.pretrain_clip import CaptionPairs

    write_scene_splits(tmp_path, seed=0, scale="micro")
    preprocess = VisionEncoder.from_open_clip("minimind-clip-micro").preprocess
    plain = CaptionPairs(tmp_path / "clip_pretrain.jsonl", tmp_path / "images", preprocess)
    mixed = CaptionPairs(tmp_path / "clip_pretrain.jsonl", tmp_path / "images", preprocess, grey_copies=0.5)
    greys = [i for i, (_, _, grey, _) in enumerate(mixed.rows) if grey]
    assert mixed.rows[:len(plain)] == plain.rows and len(greys) == len(mixed) - len(plain) > len(plain) // 5
    for i in greys[:5]:
        item = mixed[i]
        assert not any(c in item["caption"] for c in COLOURS)
        image = item["image"]  # normalised per channel, so grey pixels differ by the channel stats only
        # (within fp16 rounding, far below one 8-bit level: 0.004)
        assert torch.allclose(image[0] * 0.26862954 + 0.48145466, image[1] * 0.26130258 + 0.4578275, atol=1e-3)


def test_caption_pairs_decode_each_image_once_and_give_the_same_pixels_from_memory(tmp_path):
    from data.scenes import write_scene_splits
    from training.pretrain_clip import CaptionPairs
    from vlm.images import ImageError, load_image

    write_scene_splits(tmp_path, seed=0, scale="micro")
    preprocess = VisionEncoder.from_open_clip("minimind-clip-micro").preprocess
    pairs = CaptionPairs(tmp_path / "clip_pretrain.jsonl", tmp_path / "images", preprocess)
    uncached = CaptionPairs(tmp_path / "clip_pretrain.jsonl", tmp_path / "images", preprocess, cache_bytes=0)
    exact = preprocess(load_image(pairs.rows[5][0]))
    assert (pairs[5]["image"] - exact).abs().max() < 2e-3  # fp16 keeps far finer than one 8-bit level
    assert torch.equal(uncached[5]["image"], pairs[5]["image"]) and not uncached.cache
    first = [pairs[i]["image"] for i in range(4)]
    for path, *_ in pairs.rows[:4]:
        path.unlink(missing_ok=True)  # from now on only the memory has them
    assert all(torch.equal(a, pairs[i]["image"]) for i, a in enumerate(first))
    with pytest.raises(ImageError):
        uncached[0]  # its image is gone and nothing kept it


def test_a_row_with_a_bad_region_is_skipped_and_named(tmp_path, caplog):
    from PIL import Image

    from training.pretrain_clip import CaptionPairs

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 32), "white").save(tmp_path / "images" / "a.png")
    good = {"image": "a.png", "caption": "a red star", "regions": [{"box": [0.5, 0, 1, 1], "caption": "a red star"}]}
    bad = {"image": "a.png", "caption": "a red star", "regions": [{"box": [0.6, 0, 0.2, 1], "caption": "x"}]}
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in (good, bad)) + "\n")
    preprocess = VisionEncoder.from_open_clip("minimind-clip-micro").preprocess
    pairs = CaptionPairs(tmp_path / "rows.jsonl", tmp_path / "images", preprocess)
    assert len(pairs) == 1 and "rows.jsonl:2" in caplog.text and "regions[0].box" in caplog.text
    # the wide picture is centre-cropped to its middle half; a box over its right half keeps the crop's right half
    assert pairs[0]["regions"] == [((0.5, 0.0, 1.0, 1.0), "a red star")]
