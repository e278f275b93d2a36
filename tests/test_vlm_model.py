"""MiniMind-V: placeholder expansion, vectorised splicing, batches, errors, save/load, generation."""
import json

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, TextIteratorStreamer

import vlm  # noqa: F401  (registers the Auto classes)
from training.train_tokenizer import main as train_tokenizer
from vlm import MiniMindConfig, MiniMindForCausalLM
from vlm.modeling_vlm import MiniMindVLM
from vlm.processor import VLMProcessor
from vlm.tokenizer import IMAGE_ID, load_tokenizer
from vlm.vision import VisionEncoder

torch.set_num_threads(1)
TEXTS = ["a red circle on the left", "一个蓝色的正方形", "mail me @ home, 12 + 30 = 42", "What colour is it?"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_tok")
    (root / "pretrain.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS),
                                         encoding="utf-8")
    train_tokenizer(["--data", str(root), "--out", str(root / "tok"), "--vocab-size", "300"])
    return load_tokenizer(root / "tok")


def tiny_lm(vocab: int) -> MiniMindForCausalLM:
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2))


@pytest.fixture(scope="module")
def b16(tokenizer):
    """ViT-B-16 at random init (no download): 196 patch tokens of width 768 at 224 px."""
    model = MiniMindVLM.from_lm(tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("ViT-B-16")).eval()
    return model, VLMProcessor.from_config(model.config, tokenizer)


@pytest.fixture(scope="module")
def small(tokenizer):
    model = MiniMindVLM.from_lm(tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("minimind-clip-tiny")).eval()
    return model, VLMProcessor.from_config(model.config, tokenizer)


def image(seed: int, size=(40, 30)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def assert_decoders_agree(model: MiniMindVLM, batch) -> None:
    """HF generate with and without its cache and our lean decoder give the same greedy tokens."""
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cached = model.generate(**batch, use_cache=True, **kw)[:, n:]
    uncached = model.generate(**batch, use_cache=False, **kw)[:, n:]
    fast = model.fast_generate(batch["input_ids"], pixel_values=batch["pixel_values"],
                               attention_mask=batch["attention_mask"], max_new_tokens=5, eos_token_id=-1)
    assert torch.equal(cached, uncached) and torch.equal(cached, fast)


def test_one_image_is_196_slots_holding_the_projected_patches(b16):
    model, proc = b16
    batch = proc(messages=[{"role": "user", "content": "<image>\nWhat colour is it?"}], images=[image(0)])
    ids = batch["input_ids"]
    assert int((ids == IMAGE_ID).sum()) == 196 == model.config.num_image_tokens
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixel_values=batch["pixel_values"])
        patches = model.vision(batch["pixel_values"])
        expected = model.projector(patches)[0]
        text_rows = model.model.embed_tokens(ids)
    slots = ids[0] == IMAGE_ID
    assert patches.shape == (1, 196, 768)
    assert torch.equal(embeds[0, slots], expected)  # the N rows are the N projected patch features, in order
    assert torch.equal(embeds[0, ~slots], text_rows[0, ~slots])  # every other row is the token embedding


def test_two_images_give_392_slots_in_marker_order(b16):
    model, proc = b16
    batch = proc(text="<image> left <image> right", images=[image(1), image(2)])
    slots = batch["input_ids"][0] == IMAGE_ID
    assert int(slots.sum()) == 392
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], pixel_values=batch["pixel_values"])
        expected = model.projector(model.vision(batch["pixel_values"])).reshape(392, -1)
    assert torch.equal(embeds[0, slots], expected)


def test_literal_at_and_reserved_token(small):
    _, proc = small
    ids = proc(text="mail @ home @@@ " + "@" * 64)["input_ids"]
    assert IMAGE_ID not in ids.tolist()[0]
    assert proc.tokenizer.convert_tokens_to_ids("@") != IMAGE_ID
    with pytest.raises(ValueError, match="reserved token"):
        proc(text="sneaky <|image_pad|>")


def test_marker_image_count_mismatch_is_an_error(small):
    model, proc = small
    with pytest.raises(ValueError, match="1 <image> marker.*2 image"):
        proc(text="<image> only one", images=[image(0), image(1)])
    with pytest.raises(ValueError, match="0 <image> marker.*1 image"):
        proc(text="no marker", images=[image(0)])
    batch = proc(text="<image> x", images=[image(0)])
    with pytest.raises(ValueError, match="64 image placeholder ids .*but 2 image"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="placeholder ids .*but 0 image"):
        model(input_ids=batch["input_ids"])  # placeholders without their image
    # 128 slots for two images, but in runs of 54 and 74: an image's run was cut
    cut = torch.tensor([[1, 5] + [IMAGE_ID] * 54 + [5] + [IMAGE_ID] * 74 + [2]])
    with pytest.raises(ValueError, match="not multiples of 64"):
        model(input_ids=cut, pixel_values=torch.cat([batch["pixel_values"]] * 2))


def test_batch_mixing_text_only_and_multi_image_samples(small):
    model, proc = small
    msgs = [[{"role": "user", "content": "just text"}],
            [{"role": "user", "content": "<image> and <image>"}],
            [{"role": "user", "content": "<image> one"}]]
    imgs = [[], [image(3), image(4)], [image(5)]]
    batch = proc(messages=msgs, images=imgs)
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        out = model(**batch).logits
        # each sample alone gives the same logits (left padding only shifts positions)
        for i in range(3):
            alone = proc(messages=msgs[i], images=imgs[i] or None)
            logits = model(**alone).logits[0]
            assert torch.allclose(out[i, -logits.shape[0]:], logits, atol=1e-4)


def test_image_features_path_equals_pixel_path(small):
    model, proc = small
    batch = proc(text="<image> what?", images=[image(6)])
    with torch.no_grad():
        feats = model.vision(batch["pixel_values"]).half()  # the cache stores fp16
        a = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        b = model(input_ids=batch["input_ids"], image_features=feats).logits
    assert torch.allclose(a, b, atol=1e-2)
    with pytest.raises(ValueError, match="image_features must be"):
        model(input_ids=batch["input_ids"], image_features=torch.zeros(1, 10, 192))


def test_save_load_roundtrip_with_auto_classes(small, tmp_path):
    model, proc = small
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MiniMindVLM and type(proc2) is VLMProcessor
    assert loaded.vision.identity == model.vision.identity  # encoder weights are inside the folder
    assert not any(p.requires_grad for p in loaded.vision.parameters())
    batch = proc2(text="<image> hello", images=[image(7)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    # a folder without processor_config.json: N and preprocessing come from config.json
    (tmp_path / "processor_config.json").unlink()
    assert VLMProcessor.from_pretrained(tmp_path).num_image_tokens == 64


def test_generate_with_image_cached_equals_uncached_and_fast_path(small):
    model, proc = small
    batch = proc(messages=[[{"role": "user", "content": "<image> colour?"}],
                           [{"role": "user", "content": "longer question <image> about the colour?"}]],
                 images=[[image(8)], [image(9)]])
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cached = model.generate(**batch, use_cache=True, **kw)[:, batch["input_ids"].shape[1]:]
    uncached = model.generate(**batch, use_cache=False, **kw)[:, batch["input_ids"].shape[1]:]
    fast = model.fast_generate(batch["input_ids"], pixel_values=batch["pixel_values"],
                               attention_mask=batch["attention_mask"], max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, fast)


def test_generate_streams_text(small):
    model, proc = small
    batch = proc(text="<image> hi", images=[image(10)])
    streamer = TextIteratorStreamer(proc.tokenizer, skip_prompt=True)
    model.fast_generate(batch["input_ids"], pixel_values=batch["pixel_values"], max_new_tokens=4,
                        eos_token_id=-1, streamer=streamer)
    streamed = "".join(streamer)
    assert isinstance(streamed, str) and streamed.strip()


def test_projector_positions_tell_patch_slots_apart_and_survive_save_load(tokenizer, tmp_path):
    for kind in ("linear", "mlp"):
        model = MiniMindVLM.from_lm(tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("minimind-clip-tiny"),
                                    kind, projector_positions=True).eval()
        assert model.config.projector_positions
        same = torch.ones(1, 64, model.config.vision_hidden_size)  # one feature in every slot
        with torch.no_grad():
            out = model.project_images(image_features=same)[0]
        assert not torch.allclose(out[0], out[1])  # only the slot differs, and the output does too
        names = [n for n, _ in model.named_parameters()]
        assert any(n.startswith("projector.") and n.endswith(".table") for n in names)
    model.save_pretrained(tmp_path)
    loaded = MiniMindVLM.from_pretrained(tmp_path)
    assert loaded.config.projector_positions and loaded.config.projector_type == "mlp"
    with torch.no_grad():
        assert torch.equal(loaded.project_images(image_features=same), model.project_images(image_features=same))


def test_pixel_shuffle_packs_each_block_of_patches_into_one_token(tokenizer, tmp_path):
    from vlm.projector import PixelShuffle
    # a 4x4 grid whose patch (row, col) holds the feature [row, col]: each 2x2 block -> one token
    grid = torch.tensor([[r, c] for r in range(4) for c in range(4)], dtype=torch.float32)[None]
    packed = PixelShuffle(2)(grid)
    assert packed.shape == (1, 4, 8)
    assert packed[0, 1].tolist() == [0, 2, 0, 3, 1, 2, 1, 3]  # top-right block: (0,2) (0,3) (1,2) (1,3)
    assert packed[0, 2].tolist() == [2, 0, 2, 1, 3, 0, 3, 1]  # bottom-left block
    with pytest.raises(ValueError, match="square patch grid"):
        PixelShuffle(3)(grid)

    model = MiniMindVLM.from_lm(tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("minimind-clip-tiny"),
                                projector_shuffle=2).eval()
    assert model.config.num_image_tokens == 16 and model.vision.num_patches == 64
    proc = VLMProcessor.from_config(model.config, tokenizer)
    batch = proc(messages=[{"role": "user", "content": "<image>\nWhat colour is it?"}], images=[image(3)])
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 16
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        expected = model.projector[1](PixelShuffle(2)(model.vision(batch["pixel_values"])))[0]
        assert torch.equal(embeds[batch["input_ids"] == IMAGE_ID], expected)
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = MiniMindVLM.from_pretrained(tmp_path).eval()
    assert loaded.config.projector_shuffle == 2 and loaded.config.num_image_tokens == 16
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)


def test_projector_norm_puts_image_tokens_on_the_word_scale_and_survives_save_load(tokenizer, tmp_path):
    lm = tiny_lm(len(tokenizer))
    word_rms = float(lm.get_input_embeddings().weight.pow(2).mean().sqrt())
    model = MiniMindVLM.from_lm(lm, VisionEncoder.from_open_clip("minimind-clip-tiny"), projector_positions=True,
                                projector_norm=True).eval()
    table = next(m for m in model.projector if hasattr(m, "table")).table
    assert float(table.std()) == pytest.approx(word_rms, rel=0.1)  # a slot is as loud as a word
    features = 50.0 * torch.randn(2, 64, model.config.vision_hidden_size)  # far louder than the words
    with torch.no_grad():
        out = model.project_images(image_features=features)
        content = out - table  # what the norm gave, before the slot embedding
    assert torch.allclose(content.pow(2).mean(-1).sqrt(), torch.full((2, 64), word_rms), rtol=1e-3)
    model.save_pretrained(tmp_path)
    loaded = MiniMindVLM.from_pretrained(tmp_path).eval()
    assert loaded.config.projector_norm
    with torch.no_grad():
        assert torch.equal(loaded.project_images(image_features=features), out)


def test_glance_token_follows_the_patch_tokens_and_sees_the_whole_grid(tokenizer, tmp_path):
    from vlm.projector import PixelShuffle

    model = MiniMindVLM.from_lm(tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("minimind-clip-tiny"),
                                projector_shuffle=2, projector_glance=True, projector_norm=True).eval()
    assert model.config.num_image_tokens == 17 and model.config.num_patch_tokens == 16
    proc = VLMProcessor.from_config(model.config, tokenizer)
    batch = proc(messages=[{"role": "user", "content": "<image>\nWhat is written?"}], images=[image(5)])
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 17
    glance, norm = model.projector[0], model.projector[1]
    with torch.no_grad():
        features = model.vision(batch["pixel_values"])
        rows = model.embed_inputs(batch["input_ids"], batch["pixel_values"])[batch["input_ids"] == IMAGE_ID]
        # 16 block tokens in grid order, then the glance token: one matrix over all 64 patches at once
        assert torch.equal(rows[:16], norm(glance.local[1](PixelShuffle(2)(features)))[0])
        assert torch.allclose(rows[16], norm(features.flatten(-2) @ glance.glance.weight.T)[0], atol=1e-5)
        # a change in one corner patch moves its block token and the glance token, no other token
        changed = features.clone()
        changed[0, 0] += 1.0
        before, after = model.project_images(image_features=features), model.project_images(image_features=changed)
        moved = (after - before).abs().amax(-1)[0] > 1e-6
        assert moved.tolist() == [True] + [False] * 15 + [True]
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = MiniMindVLM.from_pretrained(tmp_path).eval()
    assert loaded.config.projector_glance and loaded.config.num_image_tokens == 17
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)


def test_bidirectional_image_attention_sees_the_whole_image_but_not_the_next_one(tokenizer, tmp_path):
    lm, encoder = tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("minimind-clip-micro")
    causal = MiniMindVLM.from_lm(lm, encoder).eval()
    model = MiniMindVLM.from_lm(lm, encoder, image_attention="bidirectional").eval()
    proc = VLMProcessor.from_config(model.config, tokenizer)
    n = model.num_image_tokens
    batch = proc(messages=[[{"role": "user", "content": "<image> and <image> colour?"}],
                           [{"role": "user", "content": "a much longer question first <image> colour?"}]],
                 images=[[image(1), image(2)], [image(3)]])
    ids = batch["input_ids"]
    blocks = model.image_blocks(ids)
    assert blocks[0][ids[0] == IMAGE_ID].tolist() == [1] * n + [2] * n
    assert blocks[1][ids[1] == IMAGE_ID].tolist() == [1] * n and int(blocks[ids != IMAGE_ID].abs().sum()) == 0
    assert causal.image_blocks(ids) is None
    with torch.no_grad():
        features = model.vision(batch["pixel_values"])
        changed = features.clone()
        changed[0, -1] += 3.0  # the last patch of the first image only
        slots = (ids[0] == IMAGE_ID).nonzero().flatten()
        for m, sees_later in ((causal, False), (model, True)):
            before = m(input_ids=ids, attention_mask=batch["attention_mask"], image_features=features).logits[0]
            after = m(input_ids=ids, attention_mask=batch["attention_mask"], image_features=changed).logits[0]
            moved = (after - before).abs().amax(-1) > 1e-5
            assert bool(moved[slots[0]]) is sees_later  # the first patch sees the last one only bidirectionally
            assert not moved[:slots[0]].any()  # text before the image never sees it
            assert moved[-1]  # the question after it does
        changed = features.clone()
        changed[1] += 3.0  # the second image: the first image's tokens still must not see it
        before = model(input_ids=ids, attention_mask=batch["attention_mask"], image_features=features).logits[0]
        after = model(input_ids=ids, attention_mask=batch["attention_mask"], image_features=changed).logits[0]
        moved = (after - before).abs().amax(-1) > 1e-5
        assert not moved[slots[:n]].any() and moved[slots[n:]].all()
    assert_decoders_agree(model, batch)
    model.save_pretrained(tmp_path)
    assert MiniMindVLM.from_pretrained(tmp_path).config.image_attention == "bidirectional"
    with pytest.raises(ValueError, match="image_attention"):
        MiniMindVLM.from_lm(lm, encoder, image_attention="sideways")


def test_vision_feature_layer_is_saved_with_the_model(tokenizer, tmp_path):
    encoder = VisionEncoder.from_open_clip("minimind-clip-tiny")
    encoder.feature_layer = [-3, -1]
    model = MiniMindVLM.from_lm(tiny_lm(len(tokenizer)), encoder).eval()
    assert model.config.vision_feature_layer == [-3, -1] and model.config.vision_hidden_size == 2 * 192
    pixels = torch.randn(1, 3, 64, 64)
    model.save_pretrained(tmp_path)
    loaded = MiniMindVLM.from_pretrained(tmp_path).eval()
    assert loaded.vision.feature_layer == [-3, -1] and loaded.vision.identity == model.vision.identity
    with torch.no_grad():
        assert torch.equal(loaded.project_images(pixels), model.project_images(pixels))


def test_image_readout_memory_lets_text_read_only_the_images_before_it():
    from vlm.readout import ImageMemory

    # row 0: text, image A (2 slots), text, image B (2 slots), text; row 1: text only; row 2: one image
    slots = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    embeds = torch.arange(3 * 7, dtype=torch.float32).view(3, 7, 1).expand(-1, -1, 4)
    memory = ImageMemory.from_slots(embeds, slots)
    assert memory.index[0].tolist() == [1, 2, 4, 5] and memory.valid.sum(-1).tolist() == [4, 0, 2]
    assert torch.equal(memory.tokens[0, :, 0], embeds[0, [1, 2, 4, 5], 0])
    allowed, reads = memory.mask(0, 7)
    assert allowed[0, 0, 3].tolist() == [True, True, False, False]  # between the images: image A only
    assert allowed[0, 0, 6].tolist() == [True] * 4
    assert not allowed[0, 0, [0, 1, 2, 4, 5]].any()  # text before any image and the slots themselves
    assert reads[:, :, 0].tolist() == [[False, False, False, True, False, False, True], [False] * 7,
                                       [False] * 7]
    allowed, reads = memory.mask(9, 1)  # a decode step: every image of its row
    assert reads[:, 0, 0].tolist() == [True, False, True] and allowed[2, 0, 0].tolist() == [True, True, False, False]
    assert ImageMemory.from_slots(embeds, torch.zeros_like(slots)) is None


def test_image_readout_queries_know_the_words_so_far_across_decode_steps():
    from vlm.readout import ImageMemory

    # one row: padding, text a, image slot, text b; a decode step then adds text c
    slots = torch.tensor([[0, 0, 1, 0]], dtype=torch.bool)
    padding = torch.tensor([[0, 1, 1, 1]])
    a, b, c, image, pad = (torch.full((1, 3), v) for v in (1.0, 3.0, 8.0, 100.0, -50.0))
    memory = ImageMemory.from_slots(torch.stack([pad, a, image, b], 1), slots, padding)
    memory.read_words(torch.stack([pad, a, image, b], 1), 0)
    assert memory.words[0, :, 0].tolist() == [0.0, 1.0, 1.0, 2.0]  # neither the image nor the padding counts
    memory.read_words(c[:, None], 4)
    assert memory.words[0, :, 0].tolist() == [4.0]  # (1 + 3 + 8) / 3


def test_image_readout_starts_closed_reads_images_and_decodes_like_a_full_forward(tokenizer, tmp_path):
    lm, encoder = tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("minimind-clip-micro")
    plain = MiniMindVLM.from_lm(lm, encoder).eval()
    model = MiniMindVLM.from_lm(lm, encoder, cross_attention_layers=[2, 0]).eval()  # 2: after the last layer
    model.projector.load_state_dict(plain.projector.state_dict())
    assert model.config.cross_attention_layers == [0, 2]
    proc = VLMProcessor.from_config(model.config, tokenizer)
    batch = proc(messages=[[{"role": "user", "content": "<image> and <image> colour?"}],
                           [{"role": "user", "content": "just some text"}],
                           [{"role": "user", "content": "a longer question first <image> colour?"}]],
                 images=[[image(1), image(2)], [], [image(3)]])
    ids = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)  # zero output projections: the LM as it was
        for block in model.image_readout.values():
            block.o_proj.weight.normal_(0.0, 0.1)
        logits = model(**batch).logits
        moved = (logits - plain(**batch).logits).abs().amax(-1) > 1e-5
        first_slot = int((ids[2] == IMAGE_ID).nonzero()[0])
        assert not moved[2, :first_slot].any() and moved[2, -1]  # text reads the image only after it
        assert not moved[1].any()  # a text-only row reads nothing
    assert_decoders_agree(model, batch)
    model.save_pretrained(tmp_path)
    loaded = MiniMindVLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)
    with pytest.raises(ValueError, match="cross_attention_layers"):
        MiniMindVLM.from_lm(lm, encoder, cross_attention_layers=[3])


@pytest.mark.parametrize("readout", [(), (2, 0)])
def test_vlm_loss_runs_the_last_layer_only_where_the_answer_is(tokenizer, readout):
    """The VLM stages' loss passes the supervised positions as `keep`: the last layer's feed-forward
    sees only the answer rows, and the loss and the trainable gradients equal a full forward's, with
    an image read-out after the last layer too."""
    from training.lm_stage import supervised_head_loss
    from training.pretrain_vlm import vlm_loss

    model = MiniMindVLM.from_lm(tiny_lm(len(tokenizer)), VisionEncoder.from_open_clip("minimind-clip-micro"),
                                cross_attention_layers=list(readout)).train()
    for block in model.image_readout.values():
        block.o_proj.weight.data.normal_(0.0, 0.1)
    proc = VLMProcessor.from_config(model.config, tokenizer)
    batch = dict(proc(messages=[[{"role": "user", "content": "<image> colour?"}],
                                [{"role": "user", "content": "just some text, a longer row"}]],
                      images=[[image(1)], []]))
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    batch["labels"] = labels
    rows = []
    hook = model.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    out = vlm_loss(model, batch)
    hook.remove()
    assert rows == [2 * 3]  # [N, hidden]: the last three tokens of each row are predicted
    out.loss_sum.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    kept = [p.grad.clone() for p in trainable]
    model.zero_grad()
    hidden, aux = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    full = supervised_head_loss(model, hidden, labels, aux)
    full.loss_sum.backward()
    assert abs(out.loss_sum.item() - full.loss_sum.item()) < 1e-5 and out.count == full.count == 6
    for a, p in zip(kept, trainable):
        assert torch.allclose(a, p.grad, atol=1e-6)
