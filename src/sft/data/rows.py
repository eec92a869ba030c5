"""Valid JSON Lines rows held as where they are, not as parsed conversations.

A million parsed ``Conversation`` objects take ~3 GB of Python objects (measured: ~2.8 KB a row
at 100k rows), and the cold data path held them all from reading to the quality analysis. A
``Row`` keeps what the pipeline reads of every row without its text (file, line, byte offset,
``is_text``, category) in ~150 bytes; its messages are parsed again from the file when asked, and
``materialize`` parses a chunk of rows with one open per file. The stages that read text (the
tokenizing workers, the quality facts, near-duplicate candidates) do it a chunk at a time, so the
memory of the cold path does not grow with the rows' text. Rows of other formats (JSON arrays,
Parquet, CSV, hub datasets) stay parsed conversations.

A ``Row`` is a ``Conversation`` (same attributes, same ``location()``): code written for
conversations reads it unchanged, and gets the same values as from the parsed row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def parse(self, value: Any, line: int) -> tuple[Conversation | None, list[str]]:
        """The conversation of a row's JSON ``value`` (as read at ``line``), or its problems."""
        from sft.data import hub
        from sft.data.formats import parse_row

        value, problems = hub.map_columns(value, dict(self.mapping))
        if problems:
            return None, problems
        conv, problems = parse_row(value, self.fmt, self.system)
        if conv is not None:
            conv.source, conv.line, conv.metric = self.path, line, self.metric
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
               category: str | None) -> RowReader:
    """The reader of one file (mapping kept as sorted pairs: the reader is hashable)."""
    return RowReader(str(Path(path)), fmt, tuple(sorted(mapping.items())), system, metric, category)
