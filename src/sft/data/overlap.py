"""Text overlap between rows, in time linear in the rows: near-duplicates (MinHash LSH over word
3-shingles) and eval/train contamination (word 8-grams). Used by ``sft.data.quality`` and
``sft.data.split``.

Rows are hashed ``CHUNK`` at a time with ``sft.data.minhash`` (numpy over all texts of a chunk,
no Python per word), so memory is bounded by a chunk plus the LSH's band keys (``minhash.band_keys``:
[rows, 21] uint64 at the default threshold).
Pure functions on lists and arrays.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sft.data.minhash import (
    EMPTY,
    NUM_PERM,
    band_keys,
    band_pairs,
    gram_hashes,
    lsh_params,
    signatures,
    word_hashes,
)
from sft.data.types import Conversation

NEAR_DUPLICATE_THRESHOLD = 0.8  # the default of data.quality.near_duplicate_threshold
SHINGLE = 3  # words per shingle for near-duplicates
CONTAMINATION_N = 8  # words per n-gram for contamination
CONTAMINATION_MIN_WORDS = 3
CONTAMINATION_OVERLAP = 0.5
CHUNK = 2048  # rows hashed at once (a few MB of text: the arrays of a chunk stay small)
_TOKEN = re.compile(r"\w+|[^\w\s]")
WORD = re.compile(r"\w")
Loc = tuple[str, int]
Tick = Callable[[int], None]  # told how many more rows are done (a Progress's update)


def loc(conv: Conversation) -> dict[str, Any]:
    return {"file": conv.source, "line": conv.line}


def tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (what ``minhash.word_hashes`` hashes).

    >>> tokens("What is 2+2?")
    ['what', 'is', '2', '+', '2', '?']
    """
    return _TOKEN.findall(text.lower())


def row_texts(conv: Conversation) -> list[str]:
    """The texts of a row that near-duplicates compare: user, assistant and tool messages and
    tool calls (system prompts repeat by design)."""
    parts = []
    for m in conv.messages:
        if m.role == "system":
            continue
        parts.append(m.content)
        if m.tool_calls:
            parts.append(json.dumps(m.tool_calls, sort_keys=True, ensure_ascii=False))
    return parts


def exact_keys(convs: list[Conversation]) -> np.ndarray:
    """uint64 digest of each row's ``conversation_key``: equal for exact repeats."""
    from sft.data.formats import conversation_key
    from sft.data.rows import materialize

    return np.array([int.from_bytes(hashlib.blake2b(conversation_key(c).encode(), digest_size=8).digest(), "little")
                     for c in materialize(convs)], dtype=np.uint64)


def _chunks(n: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _row_grams(convs: list[Conversation], n: int, per_text: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n-gram hashes, row of each) of ``convs``' ``row_texts``: n-grams run across a row's texts
    (``per_text=False``, shingles) or stay inside each text (``per_text=True``, contamination)."""
    from sft.data.rows import materialize

    texts, owner = [], []
    for r, conv in enumerate(materialize(convs)):  # rows of a JSONL file: parsed again, a chunk at a time
        parts = row_texts(conv)
        texts += parts
        owner += [r] * len(parts)
    hashes, counts, _ = word_hashes(texts)
    owner_arr = np.asarray(owner, dtype=np.int64)
    if per_text:
        grams, seg = gram_hashes(hashes, counts, n)
        return grams, owner_arr[seg]
    per_row = np.bincount(owner_arr, weights=counts, minlength=len(convs)).astype(np.int64)
    return gram_hashes(hashes, per_row, n)


def row_signatures(convs: list[Conversation], tick: Tick | None = None) -> np.ndarray:
    """MinHash signatures uint32 [rows, NUM_PERM] of each row's word 3-shingles (all ``EMPTY``:
    no text)."""
    sig = np.empty((len(convs), NUM_PERM), dtype=np.uint32)
    for a, b in _chunks(len(convs)):
        grams, row = _row_grams(convs[a:b], SHINGLE, per_text=False)
        sig[a:b] = signatures(grams, row, b - a)
        if tick:
            tick(b - a)
    return sig


def shingle_sets(convs: list[Conversation]) -> list[np.ndarray]:
    """Each row's word-shingle hashes, sorted and unique: the sets whose Jaccard similarity
    decides near-duplicates (computed for the candidate rows only)."""
    out: list[np.ndarray] = []
    for a, b in _chunks(len(convs)):
        grams, row = _row_grams(convs[a:b], SHINGLE, per_text=False)
        order = np.lexsort((grams, row))
        grams, row = grams[order], row[order]
        keep = np.r_[True, (grams[1:] != grams[:-1]) | (row[1:] != row[:-1])] if len(grams) else np.zeros(0, bool)
        grams, row = grams[keep], row[keep]
        out += np.split(grams, np.searchsorted(row, np.arange(1, b - a)))
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays.

    >>> jaccard(np.array([1, 2, 3]), np.array([2, 3, 4]))
    0.5
    """
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def similar_pairs(convs: list[Conversation], bands: np.ndarray, threshold: float,
                  first_only: bool = True) -> list[tuple[int, int, float]]:
    """(later row, earlier row, exact Jaccard) of the LSH candidate pairs of ``bands`` (the rows'
    ``minhash.band_keys`` at ``threshold``) whose shingle sets are at least ``threshold`` similar,
    in order; ``first_only``: only the earliest such row for each later row."""
    pairs = band_pairs(bands)
    if not len(pairs):
        return []
    involved = np.unique(pairs)
    sets = dict(zip(involved.tolist(), shingle_sets([convs[i] for i in involved.tolist()])))
    out = []
    done = -1
    for later, earlier in pairs.tolist():
        if first_only and later == done:
            continue
        sim = jaccard(sets[later], sets[earlier])
        if sim >= threshold:
            out.append((later, earlier, sim))
            done = later
    return out


def row_bands(convs: list[Conversation], threshold: float, tick: Tick | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(``minhash.band_keys`` at ``threshold``, whether the row has any shingle) of each row,
    from its signature ``CHUNK`` rows at a time (no [rows, 128] array is held)."""
    bands = np.empty((len(convs), lsh_params(threshold)[0]), dtype=np.uint64)
    live = np.zeros(len(convs), dtype=bool)
    for a, b in _chunks(len(convs)):
        sig = row_signatures(convs[a:b])
        bands[a:b], live[a:b] = band_keys(sig, threshold), sig[:, 0] != EMPTY
        if tick:
            tick(b - a)
    return bands, live


def near_duplicates(convs: list[Conversation], threshold: float = NEAR_DUPLICATE_THRESHOLD,
                    bands: np.ndarray | None = None, live: np.ndarray | None = None, keys: np.ndarray | None = None,
                    tick: Tick | None = None) -> list[dict[str, Any]]:
    """Rows whose shingle sets are at least ``threshold`` similar to an earlier row's, pointing at
    the earliest such row; exact repeats (``exact_keys``) with similarity 1.0. ``bands``/``live``/
    ``keys``: ``row_bands``/``exact_keys`` of ``convs`` when already computed (cached per source)."""
    keys = exact_keys(convs) if keys is None else keys
    _, first_idx, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first = first_idx[inverse.reshape(-1)]
    out: dict[int, dict[str, Any]] = {}
    for i in np.flatnonzero(first != np.arange(len(convs))).tolist():  # exact repeats: not searched
        out[i] = {**loc(convs[i]), "duplicate_of": loc(convs[int(first[i])]), "similarity": 1.0}
    if bands is None or live is None:
        bands, live = row_bands(convs, threshold, tick)
    searched = np.flatnonzero((first == np.arange(len(convs))) & live)
    rows = [convs[i] for i in searched.tolist()]
    every = len(searched) == len(convs)  # then no copy of the band keys (168 MB at a million rows)
    for later, earlier, sim in similar_pairs(rows, bands if every else bands[searched], threshold):
        i, j = int(searched[later]), int(searched[earlier])
        out[i] = {**loc(convs[i]), "duplicate_of": loc(convs[j]), "similarity": round(sim, 4)}
    return [out[i] for i in sorted(out)]


def _fields(conv: Conversation) -> list[str]:
    """The texts of an eval row that contamination compares: its prompt and its reference reply."""
    last = None
    for i in range(len(conv.messages) - 1, -1, -1):
        if conv.messages[i].role == "assistant":
            last = i
            break
    if last is None:
        return []
    prompt = next((m for m in reversed(conv.messages[:last]) if m.role == "user"), None)
    return [t for t in ((prompt.content if prompt else ""), conv.messages[last].content) if t.strip()]


class EvalGrams:
    """The word ``n``-grams of each eval row's prompt and reply: ``gram`` (sorted) and ``field``
    (the text it comes from) as parallel arrays, ``size`` the distinct n-grams of each text and
    ``row`` its eval row. Texts under ``CONTAMINATION_MIN_WORDS`` words are left out."""

    def __init__(self, eval_convs: list[Conversation], n: int = CONTAMINATION_N) -> None:
        from sft.data.rows import materialize

        texts, rows = [], []
        for e, conv in enumerate(materialize(eval_convs)):
            for text in _fields(conv):
                texts.append(text)
                rows.append(e)
        hashes, counts, word = word_hashes(texts)
        words = np.bincount(np.repeat(np.arange(len(texts)), counts), weights=word, minlength=len(texts))
        compared = words >= CONTAMINATION_MIN_WORDS
        grams, field = gram_hashes(hashes[np.repeat(compared, counts)], np.where(compared, counts, 0), n)
        pairs = np.unique(np.stack([grams, field.astype(np.uint64)], axis=1), axis=0)  # each gram once per text
        self.gram, self.field = pairs[:, 0], pairs[:, 1].astype(np.int64)
        self.size = np.bincount(self.field, minlength=len(texts))
        self.row = np.asarray(rows, dtype=np.int64)
        self.n = n

    def hits(self, grams: np.ndarray, owner: np.ndarray, min_overlap: float) -> np.ndarray:
        """(text, training row, overlap) float64 [k, 3] of every text that shares at least
        ``min_overlap`` of its n-grams with one training row (``grams`` of the rows ``owner``)."""
        if not len(self.gram) or not len(grams):
            return np.zeros((0, 3))
        pos = np.minimum(np.searchsorted(self.gram, grams), len(self.gram) - 1)
        hit = self.gram[pos] == grams
        pairs = np.unique(np.stack([owner[hit].astype(np.uint64), grams[hit]], axis=1), axis=0)  # each gram once per row
        lo = np.searchsorted(self.gram, pairs[:, 1], side="left")
        hi = np.searchsorted(self.gram, pairs[:, 1], side="right")
        reps = hi - lo
        at = np.repeat(lo, reps) + np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
        row = np.repeat(pairs[:, 0].astype(np.int64), reps)
        code, shared = np.unique(row * len(self.size) + self.field[at], return_counts=True)
        text, row = code % len(self.size), code // len(self.size)
        overlap = shared / self.size[text]
        keep = overlap >= min_overlap
        return np.stack([text[keep], row[keep], overlap[keep]], axis=1)


def train_hits(train: list[Conversation], grams: EvalGrams, min_overlap: float = CONTAMINATION_OVERLAP,
               tick: Tick | None = None) -> np.ndarray:
    """``EvalGrams.hits`` of the training rows ``train``, ``CHUNK`` rows at a time (row indices
    into ``train``)."""
    out = [np.zeros((0, 3))]
    for a, b in _chunks(len(train)):
        found = grams.hits(*_row_grams(train[a:b], grams.n, per_text=True), min_overlap)
        found[:, 1] += a
        out.append(found)
        if tick:
            tick(b - a)
    return np.concatenate(out)


def best_overlaps(grams: EvalGrams, hits: np.ndarray) -> dict[tuple[int, int], float]:
    """(eval row, training row) -> the larger overlap of the eval row's two texts."""
    out: dict[tuple[int, int], float] = {}
    for text, row, overlap in hits.tolist():
        key = (int(grams.row[int(text)]), int(row))
        if overlap > out.get(key, 0.0):
            out[key] = overlap
    return out


def overlaps(eval_convs: list[Conversation], train: list[Conversation], n: int = CONTAMINATION_N,
             min_overlap: float = CONTAMINATION_OVERLAP) -> dict[tuple[int, int], float]:
    """Every (eval row, training row) whose eval prompt or reply overlaps the training row by at
    least ``min_overlap`` (the larger of the two fields' overlaps): the pairs ``contamination``
    reports the best of, and ``sft.data.split`` keeps on one side."""
    grams = EvalGrams(eval_convs, n)
    return best_overlaps(grams, train_hits(train, grams, min_overlap))


def worst_contamination(eval_convs: list[Conversation], train: list[Conversation],
                        found: dict[tuple[int, int], float]) -> list[dict[str, Any]]:
    """The ``contamination`` findings of ``overlaps``' pairs: for each eval row, the training row
    it overlaps most (the earliest of equals)."""
    best: dict[int, tuple[float, int]] = {}
    for (e, t), overlap in sorted(found.items()):
        if overlap > best.get(e, (0.0, 0))[0]:
            best[e] = (overlap, t)
    return [{"eval": loc(eval_convs[e]), "train": loc(train[t]), "overlap": round(ov, 4)}
            for e, (ov, t) in sorted(best.items())]


def contamination(eval_convs: list[Conversation], train: list[Conversation], n: int = CONTAMINATION_N,
                  min_overlap: float = CONTAMINATION_OVERLAP) -> list[dict[str, Any]]:
    """Eval rows whose prompt or reply overlaps a training row (see ``sft.data.quality``)."""
    return worst_contamination(eval_convs, train, overlaps(eval_convs, train, n, min_overlap))
