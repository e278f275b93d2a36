"""training.probe_vision: ridge probes of frozen patch tokens, per layer and pooled."""
import torch
from PIL import Image

from training.probe_vision import layer_features, probe, ridge_accuracy
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
    assert set(report) == {"position", "shape", "word"}
    assert report["shape"]["chance"] == 0.2 and all(0.0 <= v <= 1.0 for v in report["word"].values())
