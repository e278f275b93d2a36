"""vlm.vision.VisionEncoder: patch tokens from any open_clip ViT, frozen, any real image accepted."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.images import ImageError
from vlm.vision import VisionEncoder

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"


@pytest.fixture(scope="module")
def vit_b16():
    return VisionEncoder.from_open_clip("ViT-B-16")  # random init: no download


@pytest.fixture(scope="module")
def tiny():
    return VisionEncoder.from_open_clip("minimind-clip-tiny")


def test_vit_b16_gives_196_patch_tokens_of_width_768(vit_b16):
    assert (vit_b16.num_patches, vit_b16.hidden_size, vit_b16.image_size) == (196, 768, 224)
    images = [Image.new("RGB", (300, 200), (200, 10, 10)), Image.new("L", (50, 90), 128)]
    pixels = vit_b16.pixel_values(images)
    assert pixels.shape == (2, 3, 224, 224)
    tokens = vit_b16(pixels)
    assert tokens.shape == (2, 196, 768)
    # The tokens are the patch sequence, not a pooled vector repeated, and differ between images.
    assert not torch.allclose(tokens[0, 0], tokens[0, 1]) and not torch.allclose(tokens[0], tokens[1])


def test_encoder_is_frozen_through_a_projector_backward(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    projector = torch.nn.Linear(tiny.hidden_size, 32, bias=False)
    both = torch.nn.ModuleList([tiny, projector]).train()
    assert not tiny.training and not tiny.visual.training  # train() cannot unfreeze it
    assert not any(p.requires_grad for p in tiny.parameters())
    opt = torch.optim.AdamW(both.parameters(), lr=1.0)
    pixels = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    loss = projector(tiny(pixels)).pow(2).mean()
    loss.backward()
    opt.step()
    assert projector.weight.grad is not None
    assert all(p.grad is None for p in tiny.parameters())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_state_dict_is_the_vision_tower_and_identity_tracks_weights(tiny):
    assert all(k.startswith("visual.") for k in tiny.state_dict())
    same = VisionEncoder.from_open_clip("minimind-clip-tiny")  # seeded random init: same weights
    assert same.identity == tiny.identity and tiny.identity.startswith("minimind-clip-tiny:")
    rebuilt = VisionEncoder.from_config(tiny.model_name, tiny.model_cfg)
    rebuilt.load_state_dict(tiny.state_dict())
    assert rebuilt.identity == tiny.identity
    pixels = torch.randn(1, 3, 64, 64)
    assert torch.equal(rebuilt(pixels), tiny(pixels))
    state = tiny.state_dict()
    state["visual.proj"] = state["visual.proj"] + 1e-3
    rebuilt = VisionEncoder.from_config(tiny.model_name, tiny.model_cfg)
    rebuilt.load_state_dict(state)
    assert rebuilt.identity != tiny.identity


def test_pooled_image_and_text_embeddings(tiny):
    img = tiny.embed_images([Image.new("RGB", (64, 64), (0, 0, 255)), Image.new("RGB", (64, 64))])
    txt = tiny.embed_texts(["a blue square", "左边有一个红色圆形", "x"])
    assert img.shape == (2, 128) and txt.shape == (3, 128)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_bad_file_in_a_batch_is_named(tiny, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (10, 10)).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="bad.jpg"):
        tiny.encode_images([good, tmp_path / "bad.jpg"])


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="../shared/data/photos is absent")
def test_real_photos_and_their_variants(tiny, vit_b16, tmp_path):
    """The six photos as JPEG, RGBA, grayscale, palette, 16x16 and 6000x4000 files."""
    files = []
    for photo in sorted(PHOTOS.glob("*.jpg")):
        im = Image.open(photo)
        variants = {"orig.jpg": None, "rgba.png": im.convert("RGBA"), "gray.png": im.convert("L"),
                    "pal.png": im.convert("P"), "16.png": im.resize((16, 16)),
                    "6000.jpg": im.resize((6000, 4000), Image.Resampling.NEAREST)}
        for suffix, variant in variants.items():
            if variant is None:
                files.append(photo)
                continue
            path = tmp_path / f"{photo.stem}-{suffix}"
            variant.save(path, quality=75) if suffix.endswith("jpg") else variant.save(path)
            files.append(path)
    assert len(files) == 36
    tokens = tiny.encode_images(files)
    assert tokens.shape == (36, 64, 192) and torch.isfinite(tokens).all()
    # One of each variant (of different photos) through ViT-B-16 as well.
    picks = [files[i * 6 + i] for i in range(6)]
    tokens = vit_b16.encode_images(picks)
    assert tokens.shape == (6, 196, 768) and torch.isfinite(tokens).all()


def test_feature_layer_picks_a_hidden_state_and_keys_the_identity():
    encoder = VisionEncoder.from_open_clip("minimind-clip-tiny")
    pixels = torch.randn(2, 3, 64, 64)
    outputs = {}
    hooks = [block.register_forward_hook(lambda _m, _i, out, k=k: outputs.__setitem__(k, out))
             for k, block in enumerate(encoder.visual.transformer.resblocks)]
    final = encoder(pixels)
    for hook in hooks:
        hook.remove()
    blocks, n = len(outputs), encoder.num_patches
    encoder.feature_layer = -2  # LLaVA's default: the output of the block before the last, no final norm
    assert torch.allclose(encoder(pixels), outputs[blocks - 2][:, -n:])
    assert encoder(pixels).shape == final.shape and not torch.allclose(encoder(pixels), final)
    encoder.feature_layer = blocks - 1  # counted from the front, as Hugging Face's hidden_states
    assert encoder.feature_layer == -2
    other = encoder.identity  # the cache must not hand -2's features to a -1 model
    encoder.feature_layer = [-3, -1]  # a list is concatenated along the width (LLaVA's list form)
    assert encoder.hidden_size == 2 * final.shape[-1]
    assert torch.allclose(encoder(pixels), torch.cat([outputs[blocks - 3][:, -n:], final], -1))
    assert encoder.identity not in (other, VisionEncoder.from_open_clip("minimind-clip-tiny").identity)
    encoder.feature_layer = [-2, -4]  # listed against block order: each state still lands in its place
    assert torch.allclose(encoder(pixels), torch.cat([outputs[blocks - 2][:, -n:], outputs[blocks - 4][:, -n:]], -1))
    encoder.feature_layer = -1
    assert torch.equal(encoder(pixels), final) and encoder.identity != other
    with pytest.raises(ValueError, match="hidden states"):
        encoder.feature_layer = -(blocks + 2)
