"""vlm.images.load_image: every real-world image becomes RGB, huge ones shrink, bad ones fail clearly."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlm.images import ImageError, load_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path, width: int, height: int) -> None:
    """A 200-byte PNG whose header claims width x height; its pixel data is a few zero bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def test_modes_become_rgb_with_transparency_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (10, 0, 20, 10))  # right half fully transparent (but blue underneath)
    rgba.save(tmp_path / "rgba.png")
    out = np.asarray(load_image(tmp_path / "rgba.png"))
    assert out.shape == (10, 20, 3)
    assert tuple(out[5, 2]) == (255, 0, 0) and tuple(out[5, 15]) == (255, 255, 255)

    pal = rgba.convert("P")
    pal.info["transparency"] = pal.getpixel((15, 5))
    pal.save(tmp_path / "pal.png", transparency=pal.getpixel((15, 5)))
    out = np.asarray(load_image(tmp_path / "pal.png"))
    assert tuple(out[5, 15]) == (255, 255, 255) and out[5, 2, 0] > 200

    for mode in ("L", "LA", "1", "P", "CMYK"):
        suffix = "jpg" if mode == "CMYK" else "png"
        Image.new("RGB", (8, 6), (30, 120, 200)).convert(mode).save(tmp_path / f"x.{suffix}")
        im = load_image(tmp_path / f"x.{suffix}")
        assert im.mode == "RGB" and im.size == (8, 6), mode


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    value = np.asarray(load_image(tmp_path / "g16.png"))[0, 0]
    assert abs(int(value[0]) - 128) <= 1 and len(set(value)) == 1


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)
    assert out.getpixel((10, 3))[2] > 200  # the blue strip is now at the top


def test_tiny_huge_jpeg_and_100_megapixel_png(tmp_path):
    assert load_image(Image.new("RGB", (16, 16))).size == (16, 16)
    Image.new("RGB", (6000, 4000), (10, 200, 10)).save(tmp_path / "big.jpg", quality=80)
    big = load_image(tmp_path / "big.jpg", max_pixels=1_000_000)
    assert big.width * big.height <= 1_000_000 and abs(big.width / big.height - 1.5) < 0.01
    assert big.getpixel((10, 10))[1] > 180
    huge = Image.new("RGB", (10000, 10000), (200, 30, 30))
    huge.paste((0, 0, 255), (0, 0, 5000, 10000))
    huge.save(tmp_path / "huge.png", compress_level=1)
    del huge
    out = load_image(tmp_path / "huge.png")
    assert out.size == (2048, 2048)
    assert out.getpixel((100, 100)) == (0, 0, 255) and out.getpixel((2000, 100)) == (200, 30, 30)


@pytest.mark.parametrize("width,height", [(13000, 12000), (20000, 20000)])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    _png_header_only(path, width, height)  # no pixel data: decoding would fail differently
    with pytest.raises(ImageError, match="decompression bomb") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_truncated_corrupt_and_missing_files_name_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    for name, reason in [("cut.png", "cannot decode"), ("cut.jpg", "cannot decode"),
                         ("notes.png", "not a recognised image"), ("missing.png", "no such file")]:
        with pytest.raises(ImageError, match=reason) as err:
            load_image(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(ImageError, match="upload.png"):
        load_image(b"\x89PNG garbage", name="upload.png")


def test_bytes_and_pil_inputs(tmp_path):
    src = Image.new("LA", (12, 7), (90, 255))
    buf = io.BytesIO()
    src.save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (12, 7)
    out = load_image(src)
    assert out.mode == "RGB" and src.mode == "LA"  # the caller's image is left alone
