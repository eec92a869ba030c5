"""What the data path reports: per-source and per-split counts, and the tokenized split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from sft.data.store import Examples

MAX_LISTED = 50  # problems spelled out in an SftError; `sft data check --json` lists them all


@dataclass
class SourceStats:
    name: str
    path: str
    format: str = "auto"
    rows: int = 0  # rows read (valid + invalid)
    valid: int = 0
    invalid: int = 0  # rows with at least one problem
    used: int = 0  # rows after limit, dedup and weighting


@dataclass
class DataReport:
    """Every count of what happened to the rows; nothing is dropped without being counted here."""

    split: str = "train"
    rows: int = 0
    valid: int = 0
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"file", "line", "error"}
    invalid_rows: int = 0
    skipped: int = 0  # invalid rows dropped because data.on_invalid is skip
    duplicates: int = 0  # rows that repeat an earlier row exactly
    deduplicated: int = 0  # duplicates removed (data.dedup)
    held_out: int = 0  # training rows moved to the eval split (eval.split)
    dev_held_out: int = 0  # training rows moved to the dev split (eval.dev_split)
    held_out_groups: int = 0  # near-duplicate groups (2+ distinct rows) moved to the eval split whole
    held_out_kept: int = 0  # rows drawn for the eval split but kept: their prompt or reply overlaps a training row
    conversations: int = 0  # conversations handed on (after limit, weight, dedup, split)
    examples: int = 0  # tokenized examples kept
    dropped_too_long: int = 0
    dropped_untrainable: int = 0  # no token left to train on (e.g. every turn has train: false)
    truncated: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    # tokens per kept example, input order: int64 [examples] (a list where built from a list of examples)
    lengths: np.ndarray | list[int] = field(default_factory=list)
    sources: list[SourceStats] = field(default_factory=list)
    quality_counts: dict[str, int] = field(default_factory=dict)  # findings per kind (sft.data.quality)
    quality_dropped: dict[str, int] = field(default_factory=dict)  # rows removed per kind (data.quality.drop)
    select: dict[str, Any] = field(default_factory=dict)  # what data.select kept and dropped (sft.data.select)
    cached: bool = False

    @property
    def trained_token_fraction(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def add_problem(self, file: str, line: int, error: str) -> None:
        self.invalid.append({"file": file, "line": line, "error": error})

    def unrenderable(self, file: str, line: int, error: str, skip: bool) -> None:
        """A row that was read as valid but failed to render or tokenize (e.g. tool calls for a template
        that cannot write them): it moves from valid to invalid, here and in its source's counts (and
        out of the source's ``used`` when skipped).

        >>> r = DataReport(rows=2, valid=2, sources=[SourceStats("a", "a.jsonl", rows=2, valid=2, used=2)])
        >>> r.unrenderable("a.jsonl", 3, "no tool calls in this template", skip=True)
        >>> (r.valid, r.invalid_rows, r.skipped, r.sources[0].valid, r.sources[0].invalid, r.sources[0].used)
        (1, 1, 1, 1, 1, 1)
        """
        self.invalid_rows += 1
        self.valid = max(0, self.valid - 1)
        self.skipped += skip
        for s in self.sources:
            if s.path == file:
                s.valid, s.invalid = max(0, s.valid - 1), s.invalid + 1
                s.used = max(0, s.used - skip)
                break
        self.add_problem(file, line, error)

    def problems(self) -> list[str]:
        """``FILE:LINE: error`` lines, in reading order."""
        return [f"{p['file']}:{p['line']}: {p['error']}" for p in self.invalid]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, lengths=[]))  # not a deep copy of a million lengths
        out.pop("lengths")
        out["trained_token_fraction"] = round(self.trained_token_fraction, 6)
        return out


@dataclass
class Dataset:
    examples: Examples  # a Sequence[Example] read from memory-mapped token stores
    report: DataReport
    template: str  # the resolved Jinja source used (saved with the model)
    quality: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # train split: sft.data.quality findings
    # train split: sft.data.chat.lint of the template and these examples, cached with the split so a
    # warm start does not read every example again (None: not computed; see pipeline.lint_dataset)
    lint: list[str] | None = None
