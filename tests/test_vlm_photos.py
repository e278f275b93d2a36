"""Real photos (and the same converted to awkward modes and sizes) go through processor and model."""
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlm
from training.train_tokenizer import main as train_tokenizer
from vlm.modeling_vlm import MiniMindVLM
from vlm.processor import VLMProcessor
from vlm.tokenizer import load_tokenizer
from vlm.vision import VisionEncoder

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos"
pytestmark = pytest.mark.skipif(not PHOTOS.is_dir(), reason="../shared/data/photos is absent")
torch.set_num_threads(1)


def variants(src: Path, out: Path) -> list[Path]:
    """The photo itself, as RGBA, grayscale, palette, 16x16 and 6000x4000."""
    im = Image.open(src).convert("RGB")
    made = [src]
    for name, conv in [("rgba.png", lambda x: x.convert("RGBA")), ("gray.png", lambda x: x.convert("L")),
                       ("palette.png", lambda x: x.convert("P")), ("tiny.png", lambda x: x.resize((16, 16))),
                       ("huge.jpg", lambda x: x.resize((6000, 4000)))]:
        path = out / f"{src.stem}-{name}"
        conv(im).save(path)
        made.append(path)
    return made


def test_photos_and_variants_through_processor_and_model(tmp_path):
    root = tmp_path / "tok"
    root.mkdir()
    (root / "t.jsonl").write_text('{"text": "what is in the photo? a dog, a car"}\n' * 20, encoding="utf-8")
    train_tokenizer(["--data", str(root), "--out", str(root / "out"), "--vocab-size", "300"])
    tok = load_tokenizer(root / "out")
    lm = vlm.MiniMindForCausalLM(vlm.MiniMindConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2))
    model = MiniMindVLM.from_lm(lm, VisionEncoder.from_open_clip("minimind-clip-tiny")).eval()
    proc = VLMProcessor.from_config(model.config, tok)
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) == 6
    images = [p for photo in photos for p in variants(photo, tmp_path)]
    n = model.config.num_image_tokens
    for i in range(0, len(images), 6):
        chunk = images[i:i + 6]
        batch = proc(messages=[[{"role": "user", "content": "<image>\nwhat is in the photo?"}]] * len(chunk),
                     images=[[p] for p in chunk])
        assert batch["pixel_values"].shape == (len(chunk), 3, 64, 64)
        assert torch.isfinite(batch["pixel_values"]).all()
        with torch.no_grad():
            out = model(**batch)
        assert torch.isfinite(out.logits).all()
        assert int((batch["input_ids"] == 3).sum()) == n * len(chunk)
    new = model.fast_generate(batch["input_ids"], pixel_values=batch["pixel_values"],
                              attention_mask=batch["attention_mask"], max_new_tokens=3)
    assert new.shape == (len(chunk), 3)
