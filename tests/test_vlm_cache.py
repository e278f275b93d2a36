"""Feature cache: equals direct encoding, fp16 + memory-mapped on disk, reused, never stale."""
import numpy as np
import pytest
import torch
from PIL import Image

from vlm.feature_cache import FeatureCache, image_key
from vlm.images import load_image
from vlm.vision import VisionEncoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder():
    return VisionEncoder.from_open_clip("minimind-clip-tiny", seed=0)


@pytest.fixture()
def photos(tmp_path):
    paths = []
    for i in range(5):
        g = np.random.default_rng(i)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(g.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cache_equals_direct_encoding_and_is_memory_mapped_fp16(encoder, photos, tmp_path):
    cache = FeatureCache(tmp_path / "cache", encoder)
    keys = cache.ensure(photos + [photos[0]], batch_size=2)  # a duplicate is stored once
    assert len(cache) == 5 and keys[0] == keys[-1] == image_key(photos[0])
    got = cache.get(keys)
    direct = encoder(torch.stack([encoder.preprocess(load_image(p)) for p in photos + [photos[0]]]))
    assert got.dtype == torch.float16 and got.shape == (6, encoder.num_patches, encoder.hidden_size)
    # the fp16 rounding of the direct features (up to GEMM summation order across batch sizes)
    assert torch.allclose(got.float(), direct, rtol=2e-3, atol=2e-3)
    shards = list(cache.dir.glob("shard-*.npy"))
    assert shards and isinstance(cache._shard(shards[0].name), np.memmap)


def test_reuse_across_instances_without_encoder(encoder, photos, tmp_path):
    first = FeatureCache(tmp_path / "cache", encoder)
    keys = first.ensure(photos)
    # a later stage / epoch / process: everything is found, nothing is encoded (no encoder given)
    again = FeatureCache(tmp_path / "cache", identity=encoder.identity, num_patches=encoder.num_patches,
                         hidden_size=encoder.hidden_size)
    assert again.ensure(photos) == keys
    assert torch.equal(again.get(keys), first.get(keys))
    # the same bytes under another name hit the same entry (keyed by content)
    copy = tmp_path / "renamed.png"
    copy.write_bytes(photos[2].read_bytes())
    assert again.ensure([copy]) == [keys[2]]


def test_a_file_rewritten_in_place_gets_its_new_content_s_features(encoder, photos, tmp_path):
    """Keys of files are remembered between calls, but only while the file's mtime and size hold."""
    cache = FeatureCache(tmp_path / "cache", encoder)
    target = tmp_path / "edited.png"
    target.write_bytes(photos[0].read_bytes())
    assert cache.ensure([target, photos[1]]) == [image_key(photos[0]), image_key(photos[1])]
    Image.open(photos[3]).resize((30, 30)).save(target)  # another picture under the same name
    new_key = image_key(target)
    assert new_key != image_key(photos[0])
    assert cache.ensure([target]) == [new_key]
    direct = encoder(encoder.preprocess(load_image(target))[None])
    assert torch.allclose(cache.get([new_key]).float(), direct, rtol=2e-3, atol=2e-3)


def test_changed_encoder_never_reuses_stale_features(encoder, photos, tmp_path):
    cache = FeatureCache(tmp_path / "cache", encoder)
    cache.ensure(photos)
    other = VisionEncoder.from_open_clip("minimind-clip-tiny", seed=1)  # same name, other weights
    assert other.identity != encoder.identity
    other_cache = FeatureCache(tmp_path / "cache", other)
    assert other_cache.dir != cache.dir and len(other_cache) == 0
    assert not any(k in other_cache for k in (image_key(p) for p in photos))
    with pytest.raises(ValueError, match="not in the cache and no encoder"):
        FeatureCache(tmp_path / "cache", identity=other.identity, num_patches=other.num_patches,
                     hidden_size=other.hidden_size).ensure(photos)
    keys = other_cache.ensure(photos)
    assert not torch.equal(other_cache.get(keys), cache.get(keys))


def test_unreadable_image_is_skipped_not_fatal(encoder, photos, tmp_path, caplog):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    cache = FeatureCache(tmp_path / "cache", encoder)
    keys = cache.ensure([photos[0], bad, tmp_path / "missing.png", photos[1]], names=["a", "bad one", "gone", "b"])
    assert keys[0] and keys[3] and keys[1] is None and keys[2] is None
    assert "bad one" in caplog.text and "gone" in caplog.text
    with pytest.raises(KeyError):
        cache.get([image_key(bad)])
