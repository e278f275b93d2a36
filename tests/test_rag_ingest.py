"""Ingest robustness: a folder full of bad files still indexes; each bad one is reported with its reason;
kill -9 during re-indexing leaves the old index; an edit re-embeds only that file's chunks."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from rag import Index
from rag.ingest import IngestConfig, decode_text, html_to_text, load, ocr_engine, walk

REPO = Path(__file__).resolve().parents[1]


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal valid PDF with one Helvetica text line per page (pypdf extracts it)."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def png_bytes(width: int, height: int, gray_row: bytes | None = None) -> bytes:
    """A grayscale PNG written by hand (streamed zlib), so a 100-megapixel file costs no RAM to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + (gray_row or b"\xff" * width)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def make_bad_folder(root: Path, outside: Path) -> None:
    root.mkdir(parents=True)
    (root / "good.md").write_text("# Zebras\n\nZebras have black and white stripes.\n", encoding="utf-8")
    (root / "report.pdf").write_bytes(pdf_bytes(["Quarterly revenue grew strongly", "Penguins live in Antarctica"]))
    (root / "gbk.txt").write_bytes("熊猫喜欢吃竹子，这是用GBK编码保存的中文文件。".encode("gbk"))
    (root / "page.html").write_text("<html><head><title>Volcano</title><style>p{}</style></head>"
                                    "<body><h1>Volcano</h1><p>Lava flows downhill.</p></body></html>", encoding="utf-8")
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog garbage" + os.urandom(200))
    (root / "truncated.png").write_bytes(png_bytes(64, 64)[:60])
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "huge.png").write_bytes(png_bytes(10_000, 10_000))
    outside.write_text("secret outside the folder", encoding="utf-8")
    (root / "escape.txt").symlink_to(outside)
    (root / "big.txt").write_text("big " * 100_000, encoding="utf-8")  # 400 kB > the 200 kB limit
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.txt").write_text("hidden zebra", encoding="utf-8")


EXPECTED_SKIPS = {
    "corrupt.pdf": "corrupt PDF", "truncated.png": "corrupt or truncated image", "empty.txt": "empty file",
    "binary.txt": "binary content", "huge.png": "image too large", "escape.txt": "outside the folder",
    "big.txt": "file too large", ".hidden/": "hidden",
}


def test_bad_folder_indexes_valid_files_and_reports_each_bad_one(tmp_path, caplog):
    root = tmp_path / "docs"
    make_bad_folder(root, tmp_path / "outside.txt")
    (root / "not_an_image.png").write_bytes(b"plain text, not a picture")
    (root / "stub.pdf").write_bytes(b"%PDF-1.4 cut off")  # pypdf logs "EOF marker not found" for it
    index = Index(tmp_path / "idx", ingest=IngestConfig(max_file_bytes=200_000, ocr=False))
    report = index.index_folder(root, progress=False)
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    for path, words in EXPECTED_SKIPS.items():
        assert words in reasons.get(path, ""), (path, reasons.get(path))
    # each bad file is reported once, in words: no library log lines, no object reprs
    assert reasons["not_an_image.png"].endswith("cannot identify image file") and "corrupt PDF" in reasons["stub.pdf"]
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("pypdf")]
    assert set(index.files) == {"good.md", "report.pdf", "gbk.txt", "page.html"}

    index = Index.open(tmp_path / "idx")
    top = lambda q: index.search(q, k=1)[0].chunk  # noqa: E731
    assert top("zebra stripes").path == "good.md"
    assert top("熊猫 竹子").path == "gbk.txt"
    assert top("lava").path == "page.html" and top("lava").heading == "Volcano"
    pen = top("penguins antarctica")
    assert (pen.path, pen.page) == ("report.pdf", 2)
    assert top("revenue").page == 1
    assert all("secret" not in c.text and "hidden" not in c.text for c in index.chunks.values())


@pytest.mark.parametrize("text, encoding", [
    ("café crème brûlée recipe: sugar and cream\n", "latin-1"),
    ("La crème brûlée est un dessert très apprécié, préparé avec des œufs, du sucre et de la vanille.", "cp1252"),
    ("El niño comió en la montaña. ¿Qué tal? Año nuevo.", "cp1252"),
    ("Příliš žluťoučký kůň úpěl ďábelské ódy. Česká republika.", "cp1250"),
    ("Zażółć gęślą jaźń. Łódź jest dużym miastem w Polsce.", "cp1250"),
    ("Привет, как дела? Это тестовый файл на русском языке.", "cp1251"),
    ("熊猫喜欢吃竹子，这是用GBK编码保存的中文文件。", "gbk"),
    ("這是一個用繁體中文寫的測試文件，熊貓喜歡吃竹子。", "big5"),
    ("これは日本語のテストファイルです。パンダは竹が好きです。", "shift_jis"),
])
def test_legacy_encodings_decode_to_the_exact_text(text, encoding):
    assert decode_text(text.encode(encoding)) == text


def test_loaders_and_walk_details(tmp_path):
    assert decode_text("\ufeffhello".encode("utf-8")) == "hello"
    assert decode_text("hi there".encode("utf-16")) == "hi there"
    text = html_to_text("<h2>Sub</h2><p>a &amp; b</p><script>bad()</script>")
    assert "## Sub" in text and "a & b" in text and "bad" not in text
    pages, _ = load("x.pdf", pdf_bytes(["one", "two"]))
    assert [(p.page, p.text.strip()) for p in pages] == [(1, "one"), (2, "two")]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.md").write_text("x")
    (tmp_path / "a" / "f.exe").write_bytes(b"MZ")
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    files, skipped = walk(tmp_path)
    assert [f.rel for f in files] == ["a/f.md"]
    assert {s.path for s in skipped} == {"a/f.exe", "link/"}


@pytest.mark.skipif(ocr_engine(IngestConfig()) is None, reason="rapidocr-onnxruntime not installed")
def test_image_ocr_text_is_searchable(tmp_path):
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("RGB", (420, 80), "white")
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 30)
    except OSError:
        font = ImageFont.load_default(size=30)
    ImageDraw.Draw(im).text((10, 20), "Giraffe museum", fill="black", font=font)
    (tmp_path / "docs").mkdir()
    im.save(tmp_path / "docs" / "sign.png")
    (tmp_path / "docs" / "other.txt").write_text("Nothing about animals here.")
    index = Index(tmp_path / "idx")
    index.index_folder(tmp_path / "docs", progress=False)
    hit = index.search("giraffe", k=1)[0].chunk
    assert hit.path == "sign.png" and hit.kind == "image" and "giraffe" in hit.text.lower()


def _corpus(root: Path, n: int = 120) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"doc{i:03d}.md").write_text(
            f"# Document {i}\n\n" + " ".join(f"topic{i} word{(i * 7 + j) % 97}" for j in range(150)), encoding="utf-8")


def test_incremental_reindex_touches_only_changed_files(tmp_path):
    root, path = tmp_path / "docs", tmp_path / "idx"
    _corpus(root, 30)
    first = Index(path).index_folder(root, progress=False)
    assert first["indexed"] == 30
    index = Index.open(path)
    before = {k: list(v["chunk_ids"]) for k, v in index.files.items()}
    n_edit = len(before["doc005.md"])
    (root / "doc005.md").write_text("# Edited\n\nThe aardvark sleeps all day.", encoding="utf-8")
    (root / "doc009.md").unlink()
    (root / "new.txt").write_text("A brand new note about kiwis.", encoding="utf-8")
    report = Index.open(path).index_folder(root, progress=False)
    assert (report["indexed"], report["unchanged"], report["removed"]) == (2, 28, 1)
    assert report["embedded"] == 2  # the edited file's one chunk + the new file's one chunk
    assert report["removed_chunks"] == n_edit + len(before["doc009.md"])
    index = Index.open(path)
    assert all(index.files[k]["chunk_ids"] == v for k, v in before.items() if k not in ("doc005.md", "doc009.md"))
    assert index.search("aardvark", k=1)[0].chunk.path == "doc005.md"
    assert "doc009.md" not in {c.path for c in index.chunks.values()}
    assert len(index.bm25) == len(index.dense) == len(index.chunks)
    again = Index.open(path).index_folder(root, progress=False)
    assert (again["indexed"], again["embedded"], again["version"]) == (0, 0, report["version"])


def test_kill_9_during_reindex_leaves_old_index(tmp_path):
    root, path = tmp_path / "docs", tmp_path / "idx"
    _corpus(root, 120)
    Index(path).index_folder(root, progress=False)
    old = Index.open(path)
    queries = ["topic3 word10", "topic77", "word5 word6"]
    expected = [[(h.chunk.id, round(h.score, 6)) for h in old.search(q, k=5)] for q in queries]
    for i in range(0, 120, 2):  # change half the files, so the re-index has work to be killed in
        (root / f"doc{i:03d}.md").write_text(f"# Changed {i}\n\nreplaced text number {i}", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rag", "index", str(root), "--index", str(path), "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:  # wait until the new version is being written
        if any(p.name.startswith(".tmp-") for p in path.iterdir()):
            break
        time.sleep(0.0005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not killed:
        pytest.skip("re-index finished before it could be killed (machine too fast for this check)")
    reopened = Index.open(path)
    assert reopened.version == old.version
    assert [[(h.chunk.id, round(h.score, 6)) for h in reopened.search(q, k=5)] for q in queries] == expected
    # The next run cleans up and completes.
    report = Index.open(path).index_folder(root, progress=False)
    assert report["indexed"] == 60
    assert not any(p.name.startswith(".tmp-") for p in path.iterdir())
