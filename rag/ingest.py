"""Find and load the documents of a folder: text, Markdown, HTML, PDF and images.

The walk never leaves the folder: symlinks are not followed (a file symlink is indexed only when its
target is inside the folder), hidden and system folders are skipped, files are opened with
O_NOFOLLOW and must be regular files under the size limit. Every file that is not indexed gets a
`Skipped(path, reason)`; loaders raise `LoadError` with a reason, and the caller goes on with the next
file. Files are read once into memory, so the content hash and the parse see the same bytes.
"""
from __future__ import annotations

import io
import logging
import os
import re
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

TEXT_EXT = {".txt", ".md", ".markdown", ".rst", ".text", ".log", ".csv", ".tsv", ".json", ".jsonl"}
HTML_EXT = {".html", ".htm", ".xhtml"}
PDF_EXT = {".pdf"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
SYSTEM_DIRS = {"__pycache__", "node_modules", "$RECYCLE.BIN", "System Volume Information", "lost+found"}


class LoadError(Exception):
    """A file that cannot be indexed; the message is the reason shown to the user."""


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class FileEntry:
    rel: str  # POSIX path relative to the root: the file's key in the index
    path: Path


@dataclass
class Page:
    text: str
    page: int | None = None  # 1-based page of a PDF
    kind: str = "text"  # "text", "ocr" (PDF page read by OCR) or "image"
    image: bytes | None = None  # the image file's bytes, for image embedders


@dataclass
class IngestConfig:
    max_file_bytes: int = 50 * 2**20
    max_image_pixels: int = 40_000_000  # decoding 100 MP costs ~300 MB of RAM: refuse, and say so
    ocr: bool = True  # use rapidocr-onnxruntime when it is installed
    captioner: Callable | None = None  # PIL.Image -> caption (e.g. our VLM), optional
    extensions: set[str] = field(default_factory=lambda: TEXT_EXT | HTML_EXT | PDF_EXT | IMAGE_EXT)


# ---- walking -----------------------------------------------------------------------------------
def walk(root: str | Path, config: IngestConfig | None = None) -> tuple[list[FileEntry], list[Skipped]]:
    """Files under `root` to index, and the ones left out with their reason (sorted, deterministic)."""
    config = config or IngestConfig()
    root = Path(root)
    real_root = os.path.realpath(root)
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for d in sorted(dirnames):
            rel = os.path.normpath(os.path.join(rel_dir, d)).replace(os.sep, "/")
            if d.startswith(".") or d in SYSTEM_DIRS:
                skipped.append(Skipped(rel + "/", "hidden or system folder"))
            elif os.path.islink(os.path.join(dirpath, d)):
                skipped.append(Skipped(rel + "/", "symlinked folder (not followed)"))
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith(".") or d in SYSTEM_DIRS
                                                          or os.path.islink(os.path.join(dirpath, d))))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            reason = _file_problem(full, name, real_root, config)
            if reason:
                skipped.append(Skipped(rel, reason))
            else:
                files.append(FileEntry(rel, Path(full)))
    return files, skipped


def _file_problem(full: str, name: str, real_root: str, config: IngestConfig) -> str | None:
    if name.startswith("."):
        return "hidden file"
    ext = os.path.splitext(name)[1].lower()
    if ext not in config.extensions:
        return f"unsupported file type {ext or '(no extension)'!r}"
    st = os.lstat(full)
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(full)
        if os.path.commonpath([real_root, target]) != real_root:
            return "symlink to a file outside the folder (not followed)"
        if not os.path.exists(target):
            return "broken symlink"
        return "symlink (its target inside the folder is indexed under its own name)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    if st.st_size > config.max_file_bytes:
        return f"file too large: {st.st_size} bytes > limit {config.max_file_bytes}"
    return None


def read_bytes(path: str | Path, max_bytes: int) -> bytes:
    """The file's bytes, refusing symlinks (O_NOFOLLOW: no swap after the walk) and oversize files."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise LoadError(f"cannot open: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LoadError("not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LoadError(f"file too large: > limit {max_bytes} bytes")
    if not data:
        raise LoadError("empty file (0 bytes)")
    return data


# ---- loaders -----------------------------------------------------------------------------------
def load(rel: str, data: bytes, config: IngestConfig | None = None) -> tuple[list[Page], list[str]]:
    """(pages, warnings) of one file's bytes, by extension; raises LoadError for unusable files."""
    config = config or IngestConfig()
    ext = os.path.splitext(rel)[1].lower()
    if ext in PDF_EXT:
        return load_pdf(data, config)
    if ext in IMAGE_EXT:
        return [load_image(data, config)], []
    text = decode_text(data)
    if ext in HTML_EXT:
        text = html_to_text(text)
    if not text.strip():
        raise LoadError("no text")
    return [Page(text)], []


def decode_text(data: bytes) -> str:
    """Bytes -> str: BOMs, then UTF-8, then charset detection (GBK, Big5, Latin-1, ...); binary refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    if b"\x00" in data[:8192]:
        raise LoadError("binary content (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        import charset_normalizer

        matches = charset_normalizer.from_bytes(data)
        best = matches.best()
        if best is None:
            raise LoadError("binary content (no text encoding fits)") from None
        # Western European text often fits cp1250 and cp1252 equally well ("café crème brûlée": same chaos,
        # same coherence), and charset_normalizer then returns cp1250, which turns è into č and û into ű.
        # On a tie, take cp1252, the most common legacy encoding (the one WHATWG reads latin-1 labels as).
        tied = [m for m in matches if m.encoding == "cp1252" and (m.chaos, m.coherence) == (best.chaos, best.coherence)]
        text = str(tied[0] if tied else best)
    controls = sum(1 for c in text[:20000] if ord(c) < 32 and c not in "\t\n\r\f")
    if controls > 0.05 * min(len(text), 20000):
        raise LoadError("binary content (control characters), not text")
    return text


class _HTMLText(HTMLParser):
    """Visible text of an HTML page; h1..h6 become markdown headings, so chunks know their section."""

    BLOCK = {"p", "div", "br", "li", "tr", "section", "article", "table", "ul", "ol", "pre", "blockquote",
             "header", "footer", "main", "nav", "dd", "dt", "td", "th", "hr", "title"}
    HIDDEN = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        if tag == "title":
            self.in_title = True
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        if tag == "title":
            self.in_title = False
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n")
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.hidden:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    p.close()
    text = "".join(p.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    title = " ".join("".join(p.title).split())
    if title and not text.startswith("# "):
        text = f"# {title}\n\n{text}"
    return text


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library's logger (below ERROR) for the duration."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_pdf(data: bytes, config: IngestConfig) -> tuple[list[Page], list[str]]:
    """One Page per PDF page with text; pages without a text layer go through OCR of their images."""
    from pypdf import PdfReader

    try:
        # pypdf logs what it repairs or gives up on ("EOF marker not found"); the skip report says it once
        with warnings.catch_warnings(), _quiet("pypdf"):
            warnings.simplefilter("ignore")
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise LoadError("encrypted PDF (password needed)")
            pages = list(reader.pages)
    except LoadError:
        raise
    except Exception as e:  # pypdf raises many types for broken files
        raise LoadError(f"corrupt PDF: {type(e).__name__}: {e}") from None
    out, notes = [], []
    for i, page in enumerate(pages, 1):
        try:
            text = page.extract_text() or ""
        except Exception as e:
            notes.append(f"page {i}: text extraction failed ({type(e).__name__}: {e})")
            text = ""
        if text.strip():
            out.append(Page(text, page=i))
            continue
        ocr_text = _ocr_pdf_page(page, config, notes, i)
        if ocr_text.strip():
            out.append(Page(ocr_text, page=i, kind="ocr"))
    if not out:
        raise LoadError("PDF has no extractable text" + ("" if ocr_engine(config) else " (no OCR engine installed)"))
    return out, notes


def _ocr_pdf_page(page, config: IngestConfig, notes: list[str], i: int) -> str:
    engine = ocr_engine(config)
    if engine is None:
        notes.append(f"page {i}: no text layer and OCR is off or rapidocr-onnxruntime is not installed")
        return ""
    texts = []
    try:
        for img in page.images:
            texts.append(ocr_image(_open_image(img.data, config)))
    except Exception as e:
        notes.append(f"page {i}: OCR failed ({type(e).__name__}: {e})")
    return "\n".join(t for t in texts if t)


def _open_image(data: bytes, config: IngestConfig):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we apply our own limit below
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > config.max_image_pixels:
                raise LoadError(f"image too large: {w}x{h} = {w * h / 1e6:.0f} megapixels "
                                f"> limit {config.max_image_pixels / 1e6:.0f}")
            im.load()
    except LoadError:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses > 2x its own limit before we see the size
        raise LoadError(f"image too large: {e}") from None
    except Exception as e:  # truncated data, unknown format
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # PIL names our in-memory buffer
        raise LoadError(f"corrupt or truncated image: {type(e).__name__}: {why}") from None
    return im.convert("RGB")


def load_image(data: bytes, config: IngestConfig) -> Page:
    """An image page: OCR text and caption (when available) as text, the bytes for image embedders."""
    im = _open_image(data, config)
    parts = []
    if config.captioner is not None:
        parts.append(str(config.captioner(im)).strip())
    if ocr_engine(config) is not None:
        parts.append(ocr_image(im))
    return Page("\n".join(p for p in parts if p), kind="image", image=data)


# ---- OCR ---------------------------------------------------------------------------------------
_OCR = None


def ocr_engine(config: IngestConfig):
    """rapidocr-onnxruntime's engine (its models ship inside the wheel), or None when unavailable."""
    global _OCR
    if not config.ocr:
        return None
    if _OCR is None:
        try:
            from rapidocr_onnxruntime import RapidOCR
            _OCR = RapidOCR()
        except Exception:  # not installed, or onnxruntime missing on this platform
            _OCR = False
    return _OCR or None


def ocr_image(im) -> str:
    """Text lines found in a PIL image (downscaled to 2000 px: OCR time grows with the area)."""
    import numpy as np

    if max(im.size) > 2000:
        im = im.copy()
        im.thumbnail((2000, 2000))
    result, _ = _OCR(np.asarray(im.convert("RGB"))[:, :, ::-1])  # rapidocr expects BGR like OpenCV
    return "\n".join(line[1] for line in (result or []))
