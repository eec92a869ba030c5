"""Files -> rows with their line numbers, streamed; sources -> a weighted, limited mixture.

Nothing here holds a whole file as Python objects: JSONL is read a line at a time, a JSON array
one record at a time from 1 MiB chunks (tracking the line where each record starts), Parquet a
record batch at a time, CSV a row at a time. Bytes that are not UTF-8 are decoded with
``surrogateescape`` so the row that holds them can be reported (with its byte offset) and the rest
of the file still read. A UTF-8 byte-order mark and CRLF line ends are accepted; UTF-16/32 and
gzip files are rejected by name (``text_start``); a file without rows is an error row, never
silently nothing.
"""

from __future__ import annotations

import codecs
import csv
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.errors import SftError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
CHUNK = 1 << 20
_BAD_BYTES = re.compile("[\udc80-\udcff]")
_WS = " \t\r\n"  # JSON's whitespace; other characters on a line are not blank
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_TOO_DEEP = "nested too deeply to read (over ~900 levels of [ and {); flatten or remove the row"
_NOT_READ = "; later rows of this file were not read"
_ENCODINGS = (  # byte-order marks of encodings sft does not read; UTF-32 first (its LE mark starts like UTF-16's)
    (codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
    (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE"),
)


@dataclass
class Record:
    """One row of a file: its value, or why it could not be read."""

    line: int  # 1-based line (JSONL, CSV; a JSON array: where the record starts) or row (Parquet)
    value: Any = None
    error: str | None = None
    offset: int = -1  # byte offset of a JSONL row in its file (-1: other formats): re-read by sft.data.rows


def text_start(path: Path, head: bytes) -> int:
    r"""How many bytes to skip at the start of a text file (3 for a UTF-8 byte-order mark).

    Files that are not UTF-8 text (UTF-16/32, with or without a byte-order mark, or gzip) are
    an SftError that names the encoding and how to convert.

    >>> text_start(Path("a.jsonl"), b'\xef\xbb\xbf{"a"'), text_start(Path("a.jsonl"), b'{"a"')
    (3, 0)
    >>> text_start(Path("a.jsonl"), '{"'.encode("utf-16-le"))
    Traceback (most recent call last):
    sft.errors.SftError: a.jsonl: the file is UTF-16LE text, not UTF-8; convert it, e.g. iconv -f UTF-16LE -t UTF-8 a.jsonl > a.utf8.jsonl
    """
    name = None
    for bom, enc in _ENCODINGS:
        if head.startswith(bom):
            name = enc
            break
    else:  # no mark: ASCII text in UTF-16 has a zero byte beside every character
        if len(head) >= 4 and head[1] == head[3] == 0 and head[0] and head[2]:
            name = "UTF-16LE"
        elif len(head) >= 4 and head[0] == head[2] == 0 and head[1] and head[3]:
            name = "UTF-16BE"
    if name is not None:
        fix = f"iconv -f {name} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}"
        raise SftError(f"{path}: the file is {name} text, not UTF-8; convert it, e.g. {fix}")
    if head.startswith(b"\x1f\x8b"):
        raise SftError(f"{path}: the file is gzip-compressed; decompress it first (gunzip -k {path.name})")
    return len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0


def _bad_bytes(text: str, offset: int) -> str | None:
    r"""Where ``text`` (decoded with surrogateescape, starting at byte ``offset``) is not UTF-8.

    >>> _bad_bytes("ok \udcff", offset=10)
    'contains bytes that are not UTF-8 (0xff at byte 13 of the file); re-save the file as UTF-8'
    """
    m = _BAD_BYTES.search(text)
    if m is None:
        return None
    byte = ord(m.group()) - 0xDC00
    at = offset + len(text[: m.start()].encode("utf-8", errors="surrogateescape"))
    return f"contains bytes that are not UTF-8 (0x{byte:02x} at byte {at} of the file); re-save the file as UTF-8"


def _json_error(e: json.JSONDecodeError) -> str:
    return f"not valid JSON ({e.msg} at column {e.colno}); fix or remove the row"


def _lone_surrogate(text: str, value: Any) -> str | None:
    """A JSON ``\\udXXX`` escape that is half of a UTF-16 pair: Python reads it, no tokenizer can."""
    if "\\u" not in text or not _SURROGATE_ESCAPE.search(text):  # (the plain `in` is the fast path)
        return None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        char = e.object[e.start]
        return f"holds a lone surrogate escape \\u{ord(char):04x}, which is not a character; fix the escape"
    return None


def _record(text: str, line: int, offset: int) -> Record:
    """One JSON value from ``text`` (a JSONL line starting at byte ``offset``)."""
    bad = _bad_bytes(text, offset)
    if bad:
        return Record(line, error=bad)
    try:
        value = json.loads(text.rstrip("\r\n"))  # (a trailing newline would move the error's column)
    except json.JSONDecodeError as e:
        return Record(line, error=_json_error(e))
    except RecursionError:
        return Record(line, error=_TOO_DEEP)
    lone = _lone_surrogate(text, value)
    return Record(line, error=lone) if lone else Record(line, value, offset=offset)


def read_jsonl(path: Path) -> Iterator[Record]:
    """Rows of a JSON Lines file; blank lines are skipped, line numbers are 1-based.

    A UTF-8 byte-order mark and CRLF line ends are accepted; a file without a row is an error row.
    """
    with path.open("rb") as f:
        offset = text_start(path, f.read(4))
        f.seek(offset)
        rows = 0
        for i, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            text = raw.decode("utf-8", errors="surrogateescape")
            if not text.strip(_WS):
                continue
            rows += 1
            yield _record(text, i, start)
        if not rows:
            yield Record(1, error="the file is empty (or only blank lines); write one JSON object per line")


def read_json(path: Path) -> Iterator[Record]:
    """Records of a JSON array (or of concatenated JSON objects), each with its starting line.

    The file is decoded a chunk at a time (an incremental decoder, so a character split between
    chunks stays whole); ``raw_decode`` reads one record from the buffer, and consumed text is
    dropped, so memory holds one chunk plus one record. ``byte`` tracks the file offset of
    ``buf[pos]`` so bytes that are not UTF-8 are reported where they are.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with path.open("rb") as f:
        byte = text_start(path, f.read(4))
        f.seek(byte)
        buf = ""
        pos = 0
        line = 1  # line number at buf[pos]
        eof = False
        state = "start"  # start -> (array: item <-> sep) | stream
        records = 0

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(max(CHUNK, len(buf) - pos))  # doubling: a record split over chunks costs O(n)
            text = utf8.decode(chunk, final=not chunk)
            if not chunk:
                eof = True
                if not text:
                    return False
            buf = buf[pos:] + text
            pos = 0
            return True

        while True:
            # skip whitespace, counting lines
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                    byte += 1
                if pos < len(buf) or not more():
                    break
            if pos >= len(buf):
                if state in ("item", "sep"):
                    yield Record(line, error="the JSON array is not closed; end the file with ]")
                elif not records:
                    yield Record(1, error="the file is empty; write a JSON array of rows")
                return
            ch = buf[pos]
            if state == "start":
                if ch == "[":
                    state, pos, byte = "item", pos + 1, byte + 1
                    continue
                state = "stream"
            if state == "sep":
                if ch == ",":
                    state, pos, byte = "item", pos + 1, byte + 1
                    continue
                if ch == "]":
                    return
                yield Record(line, error=f"expected , or ] between records, found {ch!r}; fix the JSON")
                return
            if state == "item" and ch == "]":
                if not records:
                    yield Record(line, error="the JSON array is empty; add rows to it")
                return
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and more():  # a number may go on in the next chunk
                        continue
                    break
                except json.JSONDecodeError as e:
                    if more():
                        continue
                    err_line = line + buf.count("\n", pos, e.pos)
                    bad = _bad_bytes(buf[pos:], byte)
                    yield Record(err_line, error=(bad or _json_error(e)) + _NOT_READ)
                    return
                except RecursionError:
                    yield Record(line, error=_TOO_DEEP + _NOT_READ)
                    return
            text = buf[pos:end]
            bad = _bad_bytes(text, byte) or _lone_surrogate(text, value)
            records += 1
            yield Record(line, error=bad) if bad else Record(line, value)
            line += text.count("\n")
            byte += len(text.encode("utf-8", errors="surrogateescape"))
            pos = end
            if state == "item":
                state = "sep"


def read_csv(path: Path) -> Iterator[Record]:
    """Rows of a CSV file with a header; the header is line 1, so the first row is line 2.

    The file is decoded a line at a time so that bytes which are not UTF-8 are reported with
    their line and byte offset; a UTF-8 byte-order mark and CRLF line ends are accepted.
    """
    with path.open("rb") as f:
        skip = text_start(path, f.read(4))
        f.seek(skip)
        pending: list[tuple[int, int, str]] = []  # (line, byte offset, text) not yet part of a row

        def lines() -> Iterator[str]:
            offset = skip
            for i, raw in enumerate(f, start=1):
                text = raw.decode("utf-8", errors="surrogateescape")
                pending.append((i, offset, text))
                offset += len(raw)
                yield text

        def first_problem() -> tuple[int, str | None]:
            """(the line a row starts on, where its bytes are not UTF-8) for the pending lines."""
            start = next((n for n, _, t in pending if t.strip()), pending[0][0] if pending else 1)
            bad = next((b for _, off, t in pending if (b := _bad_bytes(t, off))), None)
            pending.clear()
            return start, bad

        reader = csv.DictReader(lines())
        try:
            header = reader.fieldnames
        except csv.Error as e:
            yield Record(1, error=f"not valid CSV ({e}); fix the quoting")
            return
        if not header:
            yield Record(1, error="the file is empty; write a header line (e.g. instruction,output) and rows")
            return
        _, bad = first_problem()
        if bad:
            yield Record(1, error=f"the header: {bad}")
            return
        rows = 0
        try:
            for row in reader:
                start, bad = first_problem()
                rows += 1
                extra = row.pop(None, None)  # type: ignore[call-overload]
                if bad:
                    yield Record(start, error=bad)
                elif extra:
                    yield Record(start, error=f"row has {len(extra)} more cells than the header; quote cells with commas")
                else:
                    yield Record(start, {k: v for k, v in row.items() if v is not None})
        except csv.Error as e:
            start, _ = first_problem()
            yield Record(start, error=f"not valid CSV ({e}); fix the quoting" + _NOT_READ)
            return
        if not rows:
            yield Record(2, error="the file has a header but no rows; add rows below the header")


def read_parquet(path: Path) -> Iterator[Record]:
    """Rows of a Parquet file, a record batch at a time; LINE is the 1-based row number."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise SftError(f"{path}: not a readable Parquet file ({e}); re-write it") from None
    n = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged page shows only when it is read
            raise SftError(f"{path}: row {n + 1} onwards is unreadable ({e}); re-write the Parquet file") from None
        if batch is None:
            break
        for row in batch.to_pylist():
            n += 1
            yield Record(n, row)
    if not n:
        yield Record(1, error="the Parquet file has no rows; write rows to it")


_READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_file(path: Path) -> Iterator[Record]:
    """Rows of any supported file, by suffix (``.jsonl``, ``.json``, ``.parquet``, ``.csv``)."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise SftError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return reader(path)


def list_files(path: Path) -> list[Path]:
    """The data files of a source: the file itself, or a directory's supported files, sorted."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise SftError(f"{path}: the directory holds no {', '.join(SUFFIXES)} files; point at a data file")
        return files
    if not path.is_file():
        raise SftError(f"{path}: data file not found; check the path (relative paths resolve from the config's folder)")
    if path.suffix.lower() not in SUFFIXES:
        raise SftError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return [path]


def mix_counts(sizes: list[int], weights: list[float | None]) -> list[int]:
    """Rows each source contributes when some sources have a ``weight``.

    Without weights every source contributes all its rows. With weights, the total stays the
    sum of the sizes and source i gets ``total * w_i / sum(w)`` rows (a source without a weight
    counts as weight 1.0).

    >>> mix_counts([100, 100], [None, None])
    [100, 100]
    >>> mix_counts([100, 100], [3.0, 1.0])
    [150, 50]
    """
    if all(w is None for w in weights):
        return list(sizes)
    ws = [1.0 if w is None else w for w in weights]
    if any(w < 0 for w in ws) or sum(ws) <= 0:
        raise SftError("data.train[].weight: weights must be >= 0 with a positive sum; fix the weights")
    total = sum(sizes)
    counts = [round(total * w / sum(ws)) if n else 0 for n, w in zip(sizes, ws)]
    return counts


def sample_rows(n: int, k: int, rng: random.Random) -> list[int]:
    """Indices of ``k`` rows out of ``n``: a subset in input order when k <= n, else every row
    once plus k - n drawn with replacement.

    >>> sample_rows(5, 5, random.Random(0))
    [0, 1, 2, 3, 4]
    >>> len(sample_rows(3, 7, random.Random(0)))
    7
    """
    if n == 0 or k <= 0:
        return []
    if k <= n:
        return sorted(rng.sample(range(n), k))
    return list(range(n)) + sorted(rng.choices(range(n), k=k - n))
