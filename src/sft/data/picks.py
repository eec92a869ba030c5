"""The split's pick: which examples of which token stores make up the train or eval split.

``select_examples`` turns the split's conversations (after limit, dedup, eval split and weights)
into index arrays over the sources' stores, counting every use of a row as the report expects;
``save_cache``/``load_cache`` keep that pick in ``<cache_dir>/<key>/`` (``which.npy``,
``index.npy``, ``meta.json``) so a warm start reads no row and tokenizes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from sft.config import Config, SourceConfig
from sft.data.report import DataReport, Dataset, SourceStats
from sft.data.store import Examples, TokenStore
from sft.data.types import Conversation
from sft.errors import SftError

Raw = list[tuple[SourceConfig, list[Conversation]]]  # each source's valid rows, before dedup


def save_cache(path: Path, ds: Dataset) -> None:
    """Write the split's pick into folder ``path``: which store and example each example is
    (``which.npy``, ``index.npy``), the stores' folder names, the report, template and findings.
    Written into a temporary folder, then renamed: a crash never leaves a readable half."""
    ex = ds.examples
    if any(s.directory is None for s in ex.stores):
        return  # a store kept in memory (not cacheable): nothing on disk to point at
    report = asdict(replace(ds.report, lengths=[]))
    report.pop("lengths")  # the stores' offsets have them
    meta = {"template": ds.template, "report": report, "quality": ds.quality, "lint": ds.lint,
            "stores": [str(s.directory.name) for s in ex.stores if s.directory is not None]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        np.save(tmp / "which.npy", ex.which, allow_pickle=False)
        np.save(tmp / "index.npy", ex.positions, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        os.rename(tmp, path)
    except OSError:  # another process saved the same pick first (or the disk failed): not needed
        shutil.rmtree(tmp, ignore_errors=True)


def load_cache(path: Path) -> Dataset | None:
    """The split saved by ``save_cache`` with its stores memory-mapped, or None when missing or damaged."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        which = np.load(path / "which.npy", allow_pickle=False)
        index = np.load(path / "index.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None  # a damaged cache is rebuilt, not trusted
    stores = [TokenStore.open(path.parent / "sources" / name) for name in meta["stores"]]
    if any(s is None for s in stores) or len(which) != len(index):
        return None
    examples = Examples([s for s in stores if s is not None], which, index)
    rep = dict(meta["report"])
    rep["sources"] = [SourceStats(**s) for s in rep["sources"]]
    report = DataReport(**rep, lengths=examples.lengths)
    report.cached = True
    return Dataset(examples, report, meta["template"], meta.get("quality") or {}, meta.get("lint"))


def locate(convs: list[Conversation], raw: Raw) -> np.ndarray:
    """(source, row in the source) of each conversation of ``convs``, int64 [n, 2]: found in
    ``raw`` by identity, through sorted arrays of ``id()``s (16 bytes a row; a dict keyed by
    ``id()`` took ~200). A conversation not in ``raw`` is a bug, reported as such.

    >>> a, b, c = (Conversation([], "f", i) for i in (1, 2, 3))
    >>> locate([c, a, c], [(SourceConfig("f"), [a]), (SourceConfig("g"), [b, c])]).tolist()
    [[1, 1], [0, 0], [1, 1]]
    """
    ids = np.fromiter((id(c) for _, rows in raw for c in rows), np.int64)
    src = np.repeat(np.arange(len(raw), dtype=np.int64), [len(rows) for _, rows in raw])
    row = np.concatenate([np.arange(len(rows), dtype=np.int64) for _, rows in raw]) if raw else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    want = np.fromiter((id(c) for c in convs), np.int64, len(convs))
    pos = np.minimum(np.searchsorted(ids, want), max(len(ids) - 1, 0))
    if len(want) and (not len(ids) or (ids[pos] != want).any()):
        raise SftError("data: a conversation of the split is not among the rows read (a bug in sft; please report it)")
    at = order[pos] if len(ids) else np.zeros(0, np.int64)
    return np.stack([src[at], row[at]], axis=1)


def select_examples(convs: list[Conversation], raw: Raw, stores: list[TokenStore], cfg: Config,
                    report: DataReport) -> Examples:
    """The examples of ``convs`` (in order; a row weighted twice gives its examples twice) from the
    stores of their sources, counting what ``tokenize_conversations`` counts for every use of a row."""
    occ = locate(convs, raw)  # [n, (store, row)]
    bad = np.zeros(len(convs), dtype=bool)
    messages: dict[tuple[int, int], str] = {}
    for k, store in enumerate(stores):
        errors = {int(r): str(m) for r, m in store.extra["errors"]}
        if errors:
            messages.update({(k, r): m for r, m in errors.items()})
            bad |= (occ[:, 0] == k) & np.isin(occ[:, 1], list(errors))
    for i in np.flatnonzero(bad):  # in reading order, once per use
        conv = convs[i]
        report.unrenderable(conv.source, conv.line, messages[(int(occ[i, 0]), int(occ[i, 1]))],
                            skip=cfg.data.on_invalid == "skip")
    good = occ[~bad]
    first = np.zeros(len(good), np.int64)
    count = np.zeros(len(good), np.int64)
    for k, store in enumerate(stores):
        pick = good[:, 0] == k
        r = good[pick, 1]
        first[pick] = store.rows["first"][r]
        count[pick] = np.asarray(store.rows["first"])[r + 1] - first[pick]
        report.dropped_too_long += int(store.rows["too_long"][r].sum())
        report.dropped_untrainable += int(store.rows["untrainable"][r].sum())
        report.truncated += int(store.rows["truncated"][r].sum())
    # example j of use u is store good[u, 0]'s example first[u] + j
    which = np.repeat(good[:, 0], count)
    starts = np.repeat(first - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
    examples = Examples(stores, which, starts + np.arange(int(count.sum()), dtype=np.int64))
    count_examples(report, examples)
    return examples


def count_examples(report: DataReport, examples: Examples) -> None:
    report.examples = len(examples)
    report.lengths = examples.lengths
    report.total_tokens = int(examples.lengths.sum())
    report.trained_tokens = int(examples.trained_counts().sum())


def row_columns(ex: Examples, rows: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per row of each store (``rows[k]`` rows in store k): the trained tokens of its examples in
    ``ex`` (int64, -1: no example; a row used twice by ``weight`` counts once) and whether one of
    them was cut at data.max_length (bool)."""
    tokens, cut = [], []
    for k, store in enumerate(ex.stores):
        uniq = np.unique(ex.positions[ex.which == k])  # each example of the store in the split, once
        row = store.column("row")[uniq]
        n = np.bincount(row, weights=store.trained_counts()[uniq], minlength=rows[k]).astype(np.int64)
        tokens.append(np.where(np.bincount(row, minlength=rows[k]) > 0, n, -1))
        cut.append(np.bincount(row, weights=store.column("truncated")[uniq], minlength=rows[k]) > 0)
    return tokens, cut
