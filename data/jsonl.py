"""Random access to the records of a jsonl file without holding them in memory.

`JsonlFile` makes one pass over the raw bytes and keeps only where each non-blank line starts (and
its line number, for error messages) in numpy int64 arrays: 16 bytes per record, so a 1 GB file of
1 KB records costs ~16 MB of index, and `__getitem__` reads and parses exactly one line. Data loader
workers (fork or spawn) each reopen the file lazily, so the object is cheap to pickle.

A malformed record raises `DataError("path:line: what is wrong")`. With `skip_bad=True` every line
is parsed (and validated) once up front (a full read: seconds per 100 MB), bad ones are dropped
from the index, counted in `n_skipped` and reported, and training never meets them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 22  # 4 MB per read while indexing: bounds the transient numpy buffers
_IS_CONTENT = np.ones(256, dtype=bool)  # byte -> not JSON whitespace; a line of only whitespace is blank
_IS_CONTENT[[9, 10, 13, 32]] = False


class DataError(ValueError):
    """A record that cannot be used; the message starts with `path:line:`."""


Validator = Callable[[Any], None]  # raises ValueError/KeyError/TypeError with a short reason


def index_lines(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers of the non-blank lines of `path`, in one streaming pass."""
    starts, linenos = [], []
    file_pos, line_no = 0, 1  # absolute offset of the current chunk; number of its first line
    pending_start, pending_nonblank = 0, False  # the line that is still open at the end of a chunk
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            a = np.frombuffer(chunk, dtype=np.uint8)
            newlines = np.flatnonzero(a == 10)
            # Segments of this chunk: [0, nl0), [nl0+1, nl1), ..., [nl_last+1, len).
            seg_start = np.concatenate(([0], newlines + 1))
            seg_end = np.concatenate((newlines, [len(a)]))
            has = _has_content(a, seg_start, seg_end)
            pending_nonblank |= bool(has[0])
            if len(newlines):  # the open line ends in this chunk; complete lines follow; a new one opens
                if pending_nonblank:
                    starts.append(np.array([pending_start], dtype=np.int64))
                    linenos.append(np.array([line_no], dtype=np.int64))
                middle = np.flatnonzero(has[1:-1]) + 1
                starts.append(file_pos + seg_start[middle].astype(np.int64))
                linenos.append(line_no + middle.astype(np.int64))
                pending_start, pending_nonblank = file_pos + int(seg_start[-1]), bool(has[-1])
                line_no += len(newlines)
            file_pos += len(a)
    if pending_nonblank:  # last line without a trailing newline
        starts.append(np.array([pending_start], dtype=np.int64))
        linenos.append(np.array([line_no], dtype=np.int64))
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(starts) if starts else empty), (np.concatenate(linenos) if linenos else empty)


def _has_content(a: np.ndarray, seg_start: np.ndarray, seg_end: np.ndarray) -> np.ndarray:
    """Which segments hold a non-whitespace byte. A JSON line almost always starts with `{`, so only the
    rare segments that start with whitespace are scanned byte by byte."""
    nonempty = seg_end > seg_start
    has = np.zeros(len(seg_start), dtype=bool)
    has[nonempty] = _IS_CONTENT[a[seg_start[nonempty]]]
    for k in np.flatnonzero(nonempty & ~has):
        has[k] = bool(_IS_CONTENT[a[seg_start[k]:seg_end[k]]].any())
    return has


class JsonlFile:
    """Map-style view of a jsonl file: `len(f)` records, `f[i]` parses record i from disk.

    `validate(record)` (optional) checks one parsed record and raises ValueError/KeyError/TypeError
    naming what is wrong (e.g. "missing field 'text'"); it turns into a `DataError` with path:line.
    """

    def __init__(self, path: str | Path, skip_bad: bool = False, validate: Validator | None = None,
                 max_reported: int = 5):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.validate = validate
        self._fh = None
        self._pid = -1
        self._offsets, self._linenos = index_lines(self.path)
        self.n_skipped = 0
        self.skipped: list[str] = []  # the first `max_reported` error messages
        if skip_bad:
            self._drop_bad(max_reported)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> Any:
        n = len(self._offsets)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: record {i} out of range ({n} records)")
        i = i % n
        return self._parse(i, self._read(i))

    def line_number(self, i: int) -> int:
        """1-based line of record i in the file (blank lines are not records but are counted)."""
        return int(self._linenos[i])

    def where(self, i: int) -> str:
        return f"{self.path}:{self.line_number(i)}"

    def _read(self, i: int) -> bytes:
        fh = self._handle()
        fh.seek(int(self._offsets[i]))
        return fh.readline()

    def _parse(self, i: int, raw: bytes) -> Any:
        try:
            rec = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.where(i)}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where(i)}: bad JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{self.where(i)}: expected a JSON object, got {type(rec).__name__}")
        if self.validate is not None:
            try:
                self.validate(rec)
            except (ValueError, KeyError, TypeError) as e:
                reason = e.args[0] if isinstance(e, KeyError) and e.args else e
                raise DataError(f"{self.where(i)}: {reason}") from None
        return rec

    def _handle(self):
        # One handle per process: a handle inherited through fork would share its file position.
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._pid = os.getpid()
        return self._fh

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, -1
        return state

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None

    # ------------------------------------------------------------------ skip-and-count
    def _drop_bad(self, max_reported: int) -> None:
        keep = np.ones(len(self._offsets), dtype=bool)
        for i in range(len(self._offsets)):
            try:
                self._parse(i, self._read(i))
            except DataError as e:
                keep[i] = False
                if len(self.skipped) < max_reported:
                    self.skipped.append(str(e))
        self.n_skipped = int((~keep).sum())
        self._offsets, self._linenos = self._offsets[keep], self._linenos[keep]
        if self.n_skipped:
            log.warning("%s: skipped %d malformed record(s), kept %d; first: %s", self.path, self.n_skipped,
                        len(self._offsets), "; ".join(self.skipped))
