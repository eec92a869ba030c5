"""The quality analysis cached per source, like the token stores (``sft.data.source_cache``).

What costs time is per row: hashing its text into a MinHash signature, the key of exact repeats
and the row checks (empty, cut off, boilerplate, placeholders). Those are kept per source in
``<cache_dir>/quality/<key>/``, keyed by the content of the source's files, the source settings
that change its rows, ``data.format``/``data.system``, ``data.quality.boilerplate`` and the code,
so editing one file of three recomputes that source only::

    facts.json          {"version", "rows", "files", "empty", "truncated", "boilerplate", "placeholders"}:
                        reasons of flagged rows
    keys.npy            uint64 [n]       exact-repeat key of each row
    sig.npy             uint32 [n, 128]  MinHash signature (sft.data.minhash), written and read a chunk
                                         at a time; what the LSH holds is its band keys, 168 B a row
    open_end.npy words.npy               bool / int64 [n]
    hits.<eval>.npy     float64 [k, 3]   (eval text, row, overlap) against one eval set (its digest)

Written into a temporary sibling and renamed (a crash never leaves half an entry), read with
``allow_pickle=False``. What spans sources is recomputed from these arrays
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
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sft.config import Config, SourceConfig
from sft.data.minhash import EMPTY, NUM_PERM, band_keys, lsh_params
from sft.data.overlap import CHUNK, EvalGrams, best_overlaps, train_hits
from sft.data.progress import Progress
from sft.data.quality import QualitySettings, RowFacts, find_problems, row_facts, unique_rows
from sft.data.types import Conversation

FACTS_VERSION = 2  # 2: facts.json has "placeholders"
Raw = list[tuple[SourceConfig, list[Conversation]]]


def code_digest() -> str:
    """sha256 of the modules whose code decides a row's facts."""
    from sft.data import formats, hub, minhash, overlap, quality, refusals, replies, sources

    h = hashlib.sha256()
    for mod in (formats, hub, sources, minhash, overlap, quality, replies, refusals):
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


def _sig_chunks(path: Path, rows: int, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The signatures in ``path`` (an ``.npy`` of uint32 [rows, NUM_PERM]), ``chunk`` rows at a
    time, read with plain reads: no map keeps the pages of a million rows (512 MB) in this process."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if shape != (rows, NUM_PERM) or fortran or dtype != np.dtype("<u4"):
            raise ValueError(f"{path}: not uint32 [{rows}, {NUM_PERM}]")
        for a in range(0, rows, chunk):
            n = min(chunk, rows - a)
            got = np.fromfile(f, dtype="<u4", count=n * NUM_PERM)
            if len(got) != n * NUM_PERM:
                raise ValueError(f"{path}: short")
            yield got.reshape(n, NUM_PERM)


def compute_facts(convs: list[Conversation], settings: QualitySettings, label: str,
                  directory: Path | None = None) -> RowFacts:
    """``row_facts`` of one source's rows, with progress on stderr; kept in ``directory`` (the
    signatures written there a chunk at a time) when given. Written into a temporary sibling and
    renamed: a crash never leaves half an entry."""
    progress = Progress(f"quality {label}", len(convs))
    tmp = None
    try:
        if directory is None:
            return row_facts(convs, settings, progress.update)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        with open(tmp / "sig.npy", "wb") as f:
            header = {"descr": "<u4", "fortran_order": False, "shape": (len(convs), NUM_PERM)}
            np.lib.format.write_array_header_1_0(f, header)
            facts = row_facts(convs, settings, progress.update, f)
        for name in ("keys", "open_end", "words"):
            np.save(tmp / f"{name}.npy", getattr(facts, name), allow_pickle=False)
        meta = {"version": FACTS_VERSION, "rows": len(facts.keys), "empty": _sparse(facts.empty),
                "truncated": _sparse(facts.truncated), "boilerplate": _sparse(facts.boilerplate),
                "placeholders": _sparse(facts.placeholders)}
        (tmp / "facts.json").write_text(json.dumps(meta))
        if directory.exists():  # another process wrote it meanwhile: the same content
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, directory)
        tmp = None
        return facts
    finally:
        progress.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_facts(directory: Path, rows: int, threshold: float) -> RowFacts | None:
    """The facts at ``directory`` (band keys for ``threshold`` from its signatures), or None when
    absent, unreadable or not of ``rows`` rows."""
    try:
        meta = json.loads((directory / "facts.json").read_text())
        if meta.get("version") != FACTS_VERSION or meta.get("rows") != rows:
            return None
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in ("keys", "open_end", "words")}
        bands = np.empty((rows, lsh_params(threshold)[0]), np.uint64)
        live = np.zeros(rows, dtype=bool)
        at = 0
        for sig in _sig_chunks(directory / "sig.npy", rows):
            bands[at : at + len(sig)], live[at : at + len(sig)] = band_keys(sig, threshold), sig[:, 0] != EMPTY
            at += len(sig)
    except (OSError, ValueError, KeyError):
        return None
    return RowFacts(arrays["keys"], bands, live, _dense(meta["empty"], rows), _dense(meta["truncated"], rows),
                    _dense(meta["boilerplate"], rows), _dense(meta["placeholders"], rows), arrays["open_end"],
                    arrays["words"])


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
                         settings: QualitySettings, raw: Raw, root: Path | None,
                         tokens: list[np.ndarray] | None = None,
                         cut: list[np.ndarray] | None = None) -> dict[str, list[dict[str, Any]]]:
    """``quality.find_problems`` of the train split, each source's row facts (and contamination
    hits) from ``root/quality/`` when there, else computed and kept there (``root`` None: not
    kept). ``raw``: each source with all its valid rows (the rows of ``train`` are among them);
    ``tokens[s]``/``cut[s]``: per row of source ``s``, its trained tokens in the split (-1: none)
    and whether an example of it was cut at data.max_length. Every per-row value is an array
    indexed by (source, row): nothing is keyed by (file, line) in a dict."""
    from sft.data.picks import locate

    starts = np.cumsum([0] + [len(convs) for _, convs in raw])
    occ = locate(train, raw)  # [n, (source, row in the source)]
    at = starts[:-1][occ[:, 0]] + occ[:, 1]
    files: dict[str, int] = {}
    file_of = np.fromiter((files.setdefault(c.source, len(files)) for c in train), np.int64, len(train))
    line_of = np.fromiter((c.line for c in train), np.int64, len(train))
    where = file_of * (int(line_of.max(initial=0)) + 1) + line_of
    _, first = np.unique(where, return_index=True)  # each (file, line) once, as unique_rows: first-seen order
    first.sort()
    del file_of, line_of, where
    rows = [train[i] for i in first.tolist()]
    at = at[first]  # each unique row's place among every source's rows
    threshold = settings.near_duplicate_threshold
    parts: list[RowFacts] = []
    dirs: list[Path | None] = []
    for src, convs in raw:
        directory = root / "quality" / facts_key(cfg, src, settings) if root is not None else None
        facts = load_facts(directory, len(convs), threshold) if directory is not None else None
        if facts is None:
            facts = compute_facts(convs, settings, src.name or Path(src.path).name, directory)
        parts.append(facts)
        dirs.append(directory)
    everything = _concat(parts, lsh_params(threshold)[0])
    del parts
    # the usual case, every valid row once in reading order, takes no copy of the band keys
    facts = everything if np.array_equal(at, np.arange(len(everything.keys))) else everything.take(at)
    del everything
    n_tok = np.concatenate(tokens)[at] if tokens is not None and len(tokens) else None
    n_cut = np.concatenate(cut)[at] if cut is not None and len(cut) else None
    contaminated = None
    if evals:
        grams = EvalGrams(unique_rows(evals))
        index = np.full(int(starts[-1]), -1, np.int64)  # every source's row -> its unique row
        index[at] = np.arange(len(at))
        hits = []
        for s, ((src, convs), directory) in enumerate(zip(raw, dirs)):
            h = _source_hits(directory, convs, grams, src.name or Path(src.path).name).copy()
            h[:, 1] = index[int(starts[s]) + h[:, 1].astype(np.int64)] if len(h) else h[:, 1]
            hits.append(h[h[:, 1] >= 0])
        contaminated = best_overlaps(grams, np.concatenate([np.zeros((0, 3)), *hits]))
    return find_problems(rows, evals, settings, n_tok, n_cut, facts, contaminated)


def _concat(parts: list[RowFacts], bands: int) -> RowFacts:
    """The facts of every part, one after the other."""
    if not parts:
        return RowFacts(np.zeros(0, np.uint64), np.zeros((0, bands), np.uint64), np.zeros(0, bool), [], [], [], [],
                        np.zeros(0, bool), np.zeros(0, np.int64))
    if len(parts) == 1:
        return parts[0]
    out = RowFacts(np.concatenate([p.keys for p in parts]), np.empty((sum(len(p.keys) for p in parts), bands), np.uint64),
                   np.concatenate([p.live for p in parts]), [x for p in parts for x in p.empty],
                   [x for p in parts for x in p.truncated], [x for p in parts for x in p.boilerplate],
                   [x for p in parts for x in p.placeholders], np.concatenate([p.open_end for p in parts]),
                   np.concatenate([p.words for p in parts]))
    at = 0
    for p in parts:  # one part's keys at a time (then freed): never every part twice
        out.bands[at : at + len(p.keys)] = p.bands
        at += len(p.keys)
        p.bands = out.bands[:0]
    return out
