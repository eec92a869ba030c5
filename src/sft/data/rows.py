"""Valid JSON Lines rows held as where they are, not as parsed conversations.

A million parsed ``Conversation`` objects take ~3 GB of Python objects (measured: ~2.8 KB a row
at 100k rows), and the cold data path held them all from reading to the quality analysis. A
``Row`` keeps what the pipeline reads of every row without its text (file, line, byte offset,
``is_text``, category) in ~150 bytes; its messages are parsed again from the file when asked, and
``materialize`` parses a chunk of rows with one open per file. The stages that read text (the
tokenizing workers, the quality facts, near-duplicate candidates) do it a chunk at a time, so the
memory of the cold path does not grow with the rows' text. Rows that cannot be re-read where they
are (JSON arrays, CSV, Parquet, ``datasets`` and hub sources, streaming included) are written as
they are read into a ``Spill``: a temporary JSON Lines file of the source's raw rows (in
``$SFT_CACHE/rows/``, removed when its rows are dropped or the process ends); they are then held
as a ``Row`` into it, with their own file and line. A row whose value is not JSON (bytes, dates
in a Parquet column) stays a parsed conversation.

A ``Row`` is a ``Conversation`` (same attributes, same ``location()``): code written for
conversations reads it unchanged, and gets the same values as from the parsed row.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sft.data.types import Conversation, Message  # noqa: F401 (Message: the doctest)
from sft.errors import SftError


@dataclass(frozen=True)
class RowReader:
    """How the rows of one file become conversations (what ``pipeline._read_source`` decided)."""

    path: str
    fmt: str
    mapping: tuple[tuple[str, str], ...]  # hub.column_mapping, as pairs
    system: str | None
    metric: str | None
    category: str | None  # the source's category (a row's own wins)
    label: str = ""  # the file the rows came from, when ``path`` is a Spill ("" : ``path`` itself)
    spill: Spill | None = field(default=None, compare=False, repr=False)  # kept alive while its rows are

    def parse(self, value: Any, line: int) -> tuple[Conversation | None, list[str]]:
        """The conversation of a row's JSON ``value`` (as read at ``line``), or its problems."""
        from sft.data import hub
        from sft.data.formats import parse_row

        value, problems = hub.map_columns(value, dict(self.mapping))
        if problems:
            return None, problems
        conv, problems = parse_row(value, self.fmt, self.system)
        if conv is not None:
            conv.source, conv.line, conv.metric = self.label or self.path, line, self.metric
            conv.category = conv.category or self.category
        return conv, problems


class Row(Conversation):
    """A valid row of a JSON Lines file, parsed again from the file when its text is read."""

    __slots__ = ("_category", "_is_text", "_line", "_source", "offset", "reader")

    def __init__(self, conv: Conversation, offset: int, reader: RowReader) -> None:
        self._source, self._line, self.offset, self.reader = conv.source, conv.line, offset, reader
        self._is_text, self._category = conv.is_text, conv.category

    # the dataclass fields of Conversation, read-only, without an instance dict
    source = property(lambda self: self._source)  # type: ignore[assignment]
    line = property(lambda self: self._line)  # type: ignore[assignment]
    is_text = property(lambda self: self._is_text)  # type: ignore[assignment]
    category = property(lambda self: self._category)  # type: ignore[assignment]
    metric = property(lambda self: self.reader.metric)  # type: ignore[assignment]
    messages = property(lambda self: self.load().messages)  # type: ignore[assignment]
    tools = property(lambda self: self.load().tools)  # type: ignore[assignment]
    constraints = property(lambda self: self.load().constraints)  # type: ignore[assignment]

    def load(self) -> Conversation:
        """The parsed conversation (read from the file again)."""
        return materialize([self])[0]

    def __repr__(self) -> str:
        return f"Row({self._source}:{self._line})"

    def __eq__(self, other: object) -> bool:  # as the dataclass's: equal when the parsed rows are
        return isinstance(other, Conversation) and _fields(self) == _fields(other)

    __hash__ = None  # type: ignore[assignment]


def _fields(c: Conversation) -> tuple[Any, ...]:
    c = c.load() if isinstance(c, Row) else c
    return (c.messages, c.source, c.line, c.tools, c.is_text, c.metric, c.category, c.constraints)


def materialize(convs: Sequence[Conversation]) -> list[Conversation]:
    """``convs`` with every ``Row`` parsed again (one open per file); others as they are.

    >>> materialize([Conversation([Message("user", "hi")])])[0].messages[0].content
    'hi'
    """
    out: list[Conversation] = list(convs)
    by_file: dict[str, list[int]] = {}
    for i, c in enumerate(out):
        if isinstance(c, Row):
            by_file.setdefault(c.reader.path, []).append(i)
    for path, idx in by_file.items():
        idx.sort(key=lambda i: out[i].offset)  # type: ignore[attr-defined]
        with open(path, "rb") as f:
            for i in idx:
                row = out[i]
                assert isinstance(row, Row)
                f.seek(row.offset)
                conv, problems = row.reader.parse(json.loads(f.readline()), row.line)
                if conv is None:  # the file changed under the run: it was valid when read
                    raise SftError(f"{row.location()}: the row changed while sft was reading it ({problems[0] if problems else 'now invalid'}); "
                                   "run again, and do not edit data files during a run")
                out[i] = conv
    return out


def row_reader(path: str, fmt: str, mapping: dict[str, str], system: str | None, metric: str | None,
               category: str | None, spill: Spill | None = None) -> RowReader:
    """The reader of one file (mapping kept as sorted pairs: the reader is hashable); with
    ``spill``, of that file's rows written into it."""
    if spill is None:
        return RowReader(str(Path(path)), fmt, tuple(sorted(mapping.items())), system, metric, category)
    return RowReader(spill.path, fmt, tuple(sorted(mapping.items())), system, metric, category, str(path), spill)


class Spill:
    """A temporary JSON Lines file of raw rows (see the module docstring), removed when this object
    is dropped (every ``Row`` into it holds it through its reader) or at exit.

    >>> import tempfile
    >>> s = Spill(Path(tempfile.mkdtemp()))
    >>> s.add({"text": "héllo"}), s.add({"text": "x"}), s.add({"b": b"bytes"})
    (0, 23, None)
    >>> s.close(); print(Path(s.path).read_text(), end="")
    {"text": "h\\u00e9llo"}
    {"text": "x"}
    """

    def __init__(self, directory: Path) -> None:
        self.path, self.offset = "", 0
        self.file: BinaryIO | None = None
        try:  # a folder that cannot hold it (read-only, full): the rows stay parsed, as before
            directory.mkdir(parents=True, exist_ok=True)
            fd, self.path = tempfile.mkstemp(prefix="rows-", suffix=".jsonl", dir=directory)
        except OSError:
            return
        self.file = os.fdopen(fd, "wb")
        weakref.finalize(self, _remove, self.path)

    def add(self, value: Any) -> int | None:
        """Write ``value`` as one line; its byte offset, or None when it is not JSON (or the file
        cannot be written: then no later row is written either)."""
        if self.file is None:
            return None
        try:
            data = (json.dumps(value, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")
        except (TypeError, ValueError):
            return None
        try:
            self.file.write(data)
        except OSError:
            self.close()
            return None
        at, self.offset = self.offset, self.offset + len(data)
        return at

    def close(self) -> None:
        """Done writing (the rows are read from the file from now on)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def _remove(path: str) -> None:
    """The spill file, then its folder when no other spill is in it (the cache is left as it was)."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))
