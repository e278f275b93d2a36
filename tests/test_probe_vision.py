"""training.probe_vision: ridge probes of frozen patch tokens, per layer and pooled."""
import torch
from PIL import Image

from training.probe_vision import layer_features, object_patches, probe, probe_pairs, ridge_accuracy
from vlm.vision import VisionEncoder


def test_ridge_probe_reads_a_linear_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    code = torch.randn(5, 64, generator=g)
    x = code[labels] + 0.3 * torch.randn(400, 64, generator=g)  # each class a direction, plus noise
    assert ridge_accuracy(x[:300], labels[:300], x[300:], labels[300:], 5) == 1.0
    noise = torch.randn(400, 64, generator=g)  # features that carry nothing about the labels
    assert ridge_accuracy(noise[:300], labels[:300], noise[300:], labels[300:], 5) < 0.4


def test_features_of_every_layer_and_the_probe_report():
    encoder = VisionEncoder.from_open_clip("minimind-clip-micro")
    n, d = encoder.num_patches, encoder.hidden_size
    feats = layer_features(encoder, [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")])
    layers = len(encoder.visual.transformer.resblocks)
    assert set(feats) == {f"layer_{k}" for k in range(layers)} | {"final", "final_mean"}
    assert all(f.shape == (3, n * d) for k, f in feats.items() if k != "final_mean")
    assert feats["final_mean"].shape == (3, d)
    report = probe(encoder, n_train=40, n_test=20)
    assert set(report) == {"position", "shape", "word", "shortest_bar"}
    assert report["shape"]["chance"] == 0.2 and all(0.0 <= v <= 1.0 for v in report["word"].values())


def test_pair_probe_reads_the_patches_under_the_object():
    from data.scenes import Obj
    left = Obj("star", "red", "small", "left", x=0.26, y=0.5, r=0.1)  # 8x8 grid: between columns 1-2, rows 3-4
    assert object_patches(left, 8) == [25, 26, 33, 34]
    corner = Obj("star", "red", "small", "", x=0.99, y=0.01, r=0.1)  # the block stays inside the grid
    assert object_patches(corner, 8) == [6, 7, 14, 15]
    encoder = VisionEncoder.from_open_clip("minimind-clip-micro")
    report = probe_pairs(encoder, n_train=40, n_test=20)
    layers = len(encoder.visual.transformer.resblocks)
    assert set(report) == {"pair_own_shape", "pair_other_shape"}
    assert set(report["pair_own_shape"]) == {f"layer_{k}" for k in range(layers)} | {"final", "chance"}
    assert all(0.0 <= v <= 1.0 for v in report["pair_other_shape"].values())


def test_vlm_probe_follows_the_projected_tokens_into_the_lm(tmp_path):
    import json

    from training.probe_vision import probe_vlm, vlm_features
    from training.train_tokenizer import main as train_tokenizer
    from vlm import MiniMindConfig, MiniMindForCausalLM
    from vlm.modeling_vlm import MiniMindVLM
    from vlm.processor import VLMProcessor
    from vlm.tokenizer import load_tokenizer

    (tmp_path / "pretrain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Which bar is it?"] * 20))
    train_tokenizer(["--data", str(tmp_path), "--out", str(tmp_path / "tok"), "--vocab-size", "300"])
    tok = load_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    lm = MiniMindForCausalLM(MiniMindConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1))
    model = MiniMindVLM.from_lm(lm, VisionEncoder.from_open_clip("minimind-clip-micro")).eval()
    processor = VLMProcessor.from_config(model.config, tok)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    feats = vlm_features(model, processor, images, "Which bar is it?")
    n, h = model.num_image_tokens, model.config.hidden_size
    assert set(feats) == {"projected"} | {f"lm_{k}_{w}" for k in range(2) for w in ("image", "answer")}
    with torch.no_grad():  # what is probed is what the LM is given, and what its last position computes
        batch = processor(messages=[[{"role": "user", "content": "<image>\nWhich bar is it?"}]] * 3,
                          images=[[im] for im in images])
        assert torch.allclose(feats["projected"], model.project_images(batch["pixel_values"]).reshape(3, -1))
        final = model.model(inputs_embeds=model.embed_inputs(batch["input_ids"], batch["pixel_values"]))[0]
    assert feats["lm_0_image"].shape == (3, n * h) and feats["lm_1_answer"].shape == (3, h)
    # the last layer's output, before the final norm, is what the final norm turns into `final`
    assert torch.allclose(model.model.norm(feats["lm_1_answer"]), final[:, -1], atol=1e-5)
    report = probe_vlm(model, processor, n_train=30, n_test=10)
    assert set(report) == {"position", "shape", "word", "shortest_bar"} and report["shortest_bar"]["chance"] == 0.167
