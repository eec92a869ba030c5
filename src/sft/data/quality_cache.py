"""The quality analysis cached per source, like the token stores (``sft.data.source_cache``).

What costs time is per row: hashing its text into a MinHash signature, the key of exact repeats
and the row checks (empty, cut off, boilerplate). Those are kept per source in
``<cache_dir>/quality/<key>/``, keyed by the content of the source's files, the source settings
that change its rows, ``data.format``/``data.system``, ``data.quality.boilerplate`` and the code,
so editing one file of three recomputes that source only::

    facts.json          {"version", "rows", "files", "empty", "truncated", "boilerplate"}: reasons of flagged rows
    keys.npy            uint64 [n]       exact-repeat key of each row
    sig.npy             uint32 [n, 128]  MinHash signature (sft.data.minhash)
    open_end.npy words.npy               bool / int64 [n]
    hits.<eval>.npy     float64 [k, 3]   (eval text, row, overlap) against one eval set (its digest)

Written into a temporary sibling and renamed (a crash never leaves half an entry), read with
``allow_pickle=False`` through memory maps. What spans sources is recomputed from these arrays
each time, cheaply: near-duplicates across sources (LSH over the signatures, the exact Jaccard
only for candidate pairs) and contamination against the eval rows (each source's hits are cached
per eval set; a new eval set rehashes the training text once).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sft.config import Config, SourceConfig
from sft.data.minhash import NUM_PERM
from sft.data.overlap import EvalGrams, best_overlaps, train_hits
from sft.data.progress import Progress
from sft.data.quality import QualitySettings, RowFacts, find_problems, row_facts, unique_rows
from sft.data.types import Conversation

FACTS_VERSION = 1
Raw = list[tuple[SourceConfig, list[Conversation]]]


def code_digest() -> str:
    """sha256 of the modules whose code decides a row's facts."""
    from sft.data import formats, hub, minhash, overlap, quality, refusals, sources

    h = hashlib.sha256()
    for mod in (formats, hub, sources, minhash, overlap, quality, refusals):
        h.update(Path(str(mod.__file__)).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def facts_key(cfg: Config, src: SourceConfig, settings: QualitySettings) -> str:
    """The cache key of one source's facts (see the module docstring for what goes in)."""
    from sft.data.source_cache import content_fingerprint

    body = {
        "v": FACTS_VERSION,
        "files": content_fingerprint(cfg, src),
        "source": {k: v for k, v in asdict(src).items() if k not in ("weight", "metric", "name")},
        "data": {"format": cfg.data.format, "system": cfg.data.system},
        "boilerplate": list(settings.boilerplate),
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _sparse(reasons: list[str | None]) -> dict[str, str]:
    return {str(i): why for i, why in enumerate(reasons) if why}


def _dense(reasons: dict[str, str], n: int) -> list[str | None]:
    out: list[str | None] = [None] * n
    for i, why in reasons.items():
        out[int(i)] = why
    return out


def save_facts(directory: Path, facts: RowFacts) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for name in ("keys", "sig", "open_end", "words"):
            np.save(tmp / f"{name}.npy", getattr(facts, name), allow_pickle=False)
        meta = {"version": FACTS_VERSION, "rows": len(facts.keys), "empty": _sparse(facts.empty),
                "truncated": _sparse(facts.truncated), "boilerplate": _sparse(facts.boilerplate)}
        (tmp / "facts.json").write_text(json.dumps(meta))
        if directory.exists():  # another process wrote it meanwhile: the same content
            shutil.rmtree(tmp)
            return
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_facts(directory: Path, rows: int) -> RowFacts | None:
    """The facts at ``directory``, or None when absent, unreadable or not of ``rows`` rows."""
    try:
        meta = json.loads((directory / "facts.json").read_text())
        if meta.get("version") != FACTS_VERSION or meta.get("rows") != rows:
            return None
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                  for name in ("keys", "sig", "open_end", "words")}
    except (OSError, ValueError, KeyError):
        return None
    return RowFacts(arrays["keys"], arrays["sig"], _dense(meta["empty"], rows), _dense(meta["truncated"], rows),
                    _dense(meta["boilerplate"], rows), arrays["open_end"], arrays["words"])


def compute_facts(convs: list[Conversation], settings: QualitySettings, label: str,
                  sig: np.ndarray | None = None) -> RowFacts:
    """``row_facts`` of one source's rows, with progress on stderr (signatures written into ``sig``)."""
    progress = Progress(f"quality {label}", len(convs))
    try:
        return row_facts(convs, settings, progress.update, sig)
    finally:
        progress.close()


def _eval_digest(grams: EvalGrams) -> str:
    h = hashlib.sha256()
    for a in (grams.gram, grams.field, grams.size, grams.row):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _source_hits(directory: Path | None, convs: list[Conversation], grams: EvalGrams, label: str) -> np.ndarray:
    """``train_hits`` of one source's rows against ``grams``: from ``directory`` when there."""
    path = directory / f"hits.{_eval_digest(grams)}.npy" if directory is not None else None
    if path is not None and path.exists():
        return np.load(path, allow_pickle=False)
    progress = Progress(f"contamination {label}", len(convs))
    try:
        hits = train_hits(convs, grams, tick=progress.update)
    finally:
        progress.close()
    if path is not None and path.parent.exists():
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, hits, allow_pickle=False)
        os.replace(tmp, path)
    return hits


def find_problems_cached(cfg: Config, train: list[Conversation], evals: list[Conversation],
                         settings: QualitySettings, lengths: dict[tuple[str, int], int] | None,
                         cut: set[tuple[str, int]] | None, raw: Raw | None,
                         root: Path | None) -> dict[str, list[dict[str, Any]]]:
    """``quality.find_problems`` of the train split, each source's row facts (and contamination
    hits) from ``root/quality/`` when there, else computed and kept there (``root`` None: not
    kept). ``raw``: each source with all its valid rows (the rows of ``train`` are among them)."""
    rows = unique_rows(train)
    where: dict[int, tuple[int, int]] = {}  # id(conv) -> (source, row in the source)
    for s, (_, convs) in enumerate(raw or []):
        for r, conv in enumerate(convs):
            where.setdefault(id(conv), (s, r))
    if any(id(c) not in where for c in rows):  # rows from elsewhere: no per-source cache
        return find_problems(train, evals, settings, lengths, cut)
    parts: list[RowFacts] = []
    dirs: list[Path | None] = []
    starts = np.cumsum([0] + [len(convs) for _, convs in raw or []])
    sig = np.empty((int(starts[-1]), NUM_PERM), np.uint32)  # every source's signatures, in one array
    for s, (src, convs) in enumerate(raw or []):
        directory = root / "quality" / facts_key(cfg, src, settings) if root is not None else None
        facts = load_facts(directory, len(convs)) if directory is not None else None
        part = sig[starts[s] : starts[s + 1]]
        if facts is None:
            facts = compute_facts(convs, settings, src.name or Path(src.path).name, part)
            if directory is not None:
                save_facts(directory, facts)
        else:
            part[:] = facts.sig  # (then the cached file's map is dropped)
        facts.sig = part
        parts.append(facts)
        dirs.append(directory)
    src_of = np.array([where[id(c)][0] for c in rows], dtype=np.int64)
    row_of = np.array([where[id(c)][1] for c in rows], dtype=np.int64)
    at = starts[src_of] + row_of  # each row's place among every source's rows
    everything = _concat(parts, sig)
    # the usual case, every valid row once in reading order, takes no copy of the signatures
    facts = everything if np.array_equal(at, np.arange(len(sig))) else everything.take(at)
    del everything
    contaminated = None
    if evals:
        grams = EvalGrams(unique_rows(evals))
        index = {(s, r): i for i, (s, r) in enumerate(zip(src_of.tolist(), row_of.tolist()))}
        hits = []
        for s, ((src, convs), directory) in enumerate(zip(raw or [], dirs)):
            h = _source_hits(directory, convs, grams, src.name or Path(src.path).name)
            mapped = [index.get((s, int(r)), -1) for r in h[:, 1].tolist()]
            h = h.copy()
            h[:, 1] = mapped
            hits.append(h[h[:, 1] >= 0])
        contaminated = best_overlaps(grams, np.concatenate([np.zeros((0, 3)), *hits]))
    return find_problems(rows, evals, settings, lengths, cut, facts, contaminated)


def _concat(parts: list[RowFacts], sig: np.ndarray) -> RowFacts:
    """The facts of every part, one after the other (``sig``: their signatures, already joined)."""
    if not parts:
        return RowFacts(np.zeros(0, np.uint64), sig, [], [], [], np.zeros(0, bool), np.zeros(0, np.int64))
    return RowFacts(np.concatenate([p.keys for p in parts]), sig,
                    [x for p in parts for x in p.empty], [x for p in parts for x in p.truncated],
                    [x for p in parts for x in p.boilerplate], np.concatenate([p.open_end for p in parts]),
                    np.concatenate([p.words for p in parts]))

