"""Files -> rows with their line numbers, streamed; sources -> a weighted, limited mixture.

Nothing here holds a whole file as Python objects: JSONL is read a line at a time, a JSON array
one record at a time from 1 MiB chunks (tracking the line where each record starts), Parquet a
record batch at a time, CSV a row at a time. Bytes that are not UTF-8 are decoded with
``surrogateescape`` so the row that holds them can be reported and the rest of the file still read.
"""

from __future__ import annotations

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
_WS = " \t\r\n"


@dataclass
class Record:
    """One row of a file: its value, or why it could not be read."""

    line: int  # 1-based line (JSONL, CSV; a JSON array: where the record starts) or row (Parquet)
    value: Any = None
    error: str | None = None


def _bad_bytes(text: str) -> str | None:
    m = _BAD_BYTES.search(text)
    if m is None:
        return None
    byte = ord(m.group()) - 0xDC00
    return f"contains bytes that are not UTF-8 (0x{byte:02x}); re-save the file as UTF-8"


def _json_error(e: json.JSONDecodeError) -> str:
    return f"not valid JSON ({e.msg} at column {e.colno}); fix or remove the row"


def read_jsonl(path: Path) -> Iterator[Record]:
    """Rows of a JSON Lines file; blank lines are skipped, line numbers are 1-based."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="surrogateescape")
            if not text.strip():
                continue
            bad = _bad_bytes(text)
            if bad:
                yield Record(i, error=bad)
                continue
            try:
                yield Record(i, json.loads(text.rstrip("\r\n")))
            except json.JSONDecodeError as e:
                yield Record(i, error=_json_error(e))


def read_json(path: Path) -> Iterator[Record]:
    """Records of a JSON array (or of concatenated JSON objects), each with its starting line.

    The file is decoded a chunk at a time; ``raw_decode`` reads one record from the buffer, and
    consumed text is dropped, so memory holds one chunk plus one record.
    """
    decoder = json.JSONDecoder()
    with path.open("rb") as f:
        buf = ""
        pos = 0
        line = 1  # line number at buf[pos]
        eof = False
        state = "start"  # start -> (array: item <-> sep) | stream

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(max(CHUNK, len(buf) - pos))  # doubling: a record split over chunks costs O(n)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk.decode("utf-8", errors="surrogateescape")
            pos = 0
            return True

        while True:
            # skip whitespace, counting lines
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or not more():
                    break
            if pos >= len(buf):
                if state in ("item", "sep"):
                    yield Record(line, error="the JSON array is not closed; end the file with ]")
                elif state == "start":
                    yield Record(1, error="the file is empty; write a JSON array of rows")
                return
            ch = buf[pos]
            if state == "start":
                if ch == "[":
                    state, pos = "item", pos + 1
                    continue
                state = "stream"
            if state == "sep":
                if ch == ",":
                    state, pos = "item", pos + 1
                    continue
                if ch == "]":
                    return
                yield Record(line, error=f"expected , or ] between records, found {ch!r}; fix the JSON")
                return
            if state == "item" and ch == "]":
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
                    yield Record(err_line, error=_json_error(e) + "; later rows of this file were not read")
                    return
            text = buf[pos:end]
            bad = _bad_bytes(text)
            yield Record(line, error=bad) if bad else Record(line, value)
            line += text.count("\n")
            pos = end
            if state == "item":
                state = "sep"


def read_csv(path: Path) -> Iterator[Record]:
    """Rows of a CSV file with a header; the header is line 1, so the first row is line 2."""
    with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        try:
            for row in reader:
                extra = row.pop(None, None)  # type: ignore[call-overload]
                cells = "".join(str(v) for v in row.values() if v is not None)
                bad = _bad_bytes(cells + "".join(map(str, extra or [])))
                if bad:
                    yield Record(start, error=bad)
                elif extra:
                    yield Record(start, error=f"row has {len(extra)} more cells than the header; quote cells with commas")
                else:
                    yield Record(start, {k: v for k, v in row.items() if v is not None})
                start = reader.line_num + 1
        except csv.Error as e:
            yield Record(start, error=f"not valid CSV ({e}); fix the quoting")


def read_parquet(path: Path) -> Iterator[Record]:
    """Rows of a Parquet file, a record batch at a time; LINE is the 1-based row number."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise SftError(f"{path}: not a readable Parquet file ({e}); re-write it") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield Record(n, row)


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


def split_holdout(n: int, fraction: float, seed: int) -> list[bool]:
    """Which of ``n`` rows are held out for evaluation (``eval.split``), chosen with ``seed``.

    At least one row is held out when ``fraction > 0`` and there are two rows or more.

    >>> split_holdout(10, 0.2, seed=0).count(True)
    2
    >>> split_holdout(10, 0.0, seed=0).count(True)
    0
    """
    if fraction <= 0 or n < 2:
        return [False] * n
    k = min(n - 1, max(1, round(n * fraction)))
    chosen = set(random.Random(seed).sample(range(n), k))
    return [i in chosen for i in range(n)]
