"""Split loaded pages into chunks that remember where they came from (path, page, heading, span).

LangChain's `RecursiveCharacterTextSplitter` does the splitting. Its defaults know no Chinese
punctuation (a Chinese page then only breaks at newlines or mid-sentence), so the separators add the
CJK sentence and clause marks 。！？；， and keep each mark at the end of its sentence. Sizes are in
characters, or in retrieval tokens (a CJK character or a word counts one), cheap enough for the
splitter to call on every candidate piece.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from langchain_text_splitters import RecursiveCharacterTextSplitter

SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", ". ", "! ", "? ", "; ", "，", ", ", " ", ""]
_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


def count_tokens(text: str) -> int:
    """Approximate retrieval tokens: one per CJK character, one per other word."""
    return len(_TOKEN.findall(text))


@dataclass
class ChunkerConfig:
    size: int = 600
    overlap: int = 100
    unit: str = "chars"  # "chars" or "tokens"

    def __post_init__(self):
        if self.unit not in ("chars", "tokens"):
            raise ValueError(f"chunker unit must be 'chars' or 'tokens', not {self.unit!r}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"chunk overlap {self.overlap} must be >= 0 and < size {self.size}")


@dataclass
class Chunk:
    text: str
    path: str  # relative to the indexed folder (or any source key)
    page: int | None = None  # 1-based PDF page
    heading: str | None = None  # "Title > Section" of the nearest markdown/HTML headings above
    start: int = 0  # character span inside the page's text
    end: int = 0
    kind: str = "text"  # "text", "ocr" (text from OCR), "image"
    id: int = -1  # assigned by the index
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def headings_at(text: str) -> list[tuple[int, str]]:
    """(offset, "H1 > H2 > ...") at each markdown heading line, nesting by level."""
    out, stack = [], []
    for m in _HEADING.finditer(text):
        level = len(m.group(1))
        stack = [s for s in stack if s[0] < level] + [(level, m.group(2).strip())]
        out.append((m.start(), " > ".join(s[1] for s in stack)))
    return out


class Chunker:
    def __init__(self, config: ChunkerConfig | None = None):
        self.config = config or ChunkerConfig()
        length = len if self.config.unit == "chars" else count_tokens
        self.splitter = RecursiveCharacterTextSplitter(
            separators=SEPARATORS, keep_separator="end", chunk_size=self.config.size,
            chunk_overlap=self.config.overlap, length_function=length, add_start_index=True)

    def split(self, text: str, path: str, page: int | None = None, kind: str = "text") -> list[Chunk]:
        """Chunks of one page of text; empty or whitespace-only text gives none."""
        if not text.strip():
            return []
        heads = headings_at(text)
        chunks = []
        for doc in self.splitter.create_documents([text]):
            start = doc.metadata.get("start_index", -1)
            if start < 0:  # the splitter could not place it (should not happen): search ourselves
                start = max(0, text.find(doc.page_content))
            heading = None
            for pos, h in heads:
                if pos > start:
                    break
                heading = h
            chunks.append(Chunk(doc.page_content, path, page, heading, start, start + len(doc.page_content), kind))
        return chunks
