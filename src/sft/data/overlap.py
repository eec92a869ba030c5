"""Text overlap between rows, in time linear in the rows: near-duplicates (MinHash LSH over word
3-shingles) and eval/train contamination (word 8-grams). Used by ``sft.data.quality``.

Texts become lower-cased word and punctuation tokens, tokens become small ints (``Vocab``, in order
of first appearance so every run hashes the same), and n-grams become 64-bit hashes computed for
all rows in one numpy pass (``segment_grams``). Pure functions on lists and arrays.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections import defaultdict
from typing import Any

import numpy as np

from sft.data.types import Conversation

NEAR_DUPLICATE_THRESHOLD = 0.8  # the default of data.quality.near_duplicate_threshold
SHINGLE = 3  # words per shingle for near-duplicates
NUM_PERM = 128  # MinHash permutations
MAX_CANDIDATES = 100  # earlier rows of one LSH bucket checked per row (bounds the time on templated data)
CONTAMINATION_N = 8  # words per n-gram for contamination
CONTAMINATION_MIN_WORDS = 3
CONTAMINATION_OVERLAP = 0.5
_TOKEN = re.compile(r"\w+|[^\w\s]")
WORD = re.compile(r"\w")
Loc = tuple[str, int]


def loc(conv: Conversation) -> dict[str, Any]:
    return {"file": conv.source, "line": conv.line}


def tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks.

    >>> tokens("What is 2+2?")
    ['what', 'is', '2', '+', '2', '?']
    """
    return _TOKEN.findall(text.lower())


class Vocab:
    """Token -> small int, in order of first appearance (so hashes are the same on every run)."""

    def __init__(self) -> None:
        self.ids: defaultdict[str, int] = defaultdict(itertools.count(1).__next__)

    def __call__(self, toks: list[str]) -> np.ndarray:
        ids = self.ids
        return np.array([ids[t] for t in toks], dtype=np.uint64)

    def text(self, conv: Conversation) -> list[np.ndarray]:
        """Token ids of each text of ``conv`` that near-duplicates and contamination compare."""
        return [self(tokens(t)) for t in _doc_text(conv)]


def gram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of the ``n``-grams of ``ids`` (one hash of the whole text when it is shorter).

    >>> h = gram_hashes(np.array([1, 2, 3, 1, 2, 3], dtype=np.uint64), 3)
    >>> len(h), bool(h[0] == h[3]), bool(h[0] == h[1])
    (4, True, False)
    >>> len(gram_hashes(np.array([7, 8], dtype=np.uint64), 3)), len(gram_hashes(np.array([], dtype=np.uint64), 3))
    (1, 0)
    """
    if len(ids) == 0:
        return ids
    if len(ids) < n:  # the whole text as one gram; its length keeps it apart from true n-grams
        ids, n = np.append(ids, np.uint64(1_000_003 + len(ids))), len(ids) + 1
    with np.errstate(over="ignore"):
        # polynomial hash mod 2^64: each window [L-n+1, n] times the powers (unsigned overflow wraps)
        h = np.lib.stride_tricks.sliding_window_view(ids, n) @ _powers(n)
        h ^= h >> np.uint64(33)  # finalise (murmur3 fmix64) so nearby grams spread out
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


@functools.lru_cache(maxsize=64)
def _powers(n: int) -> np.ndarray:
    return np.array([pow(0x100000001B3, n - 1 - k, 1 << 64) for k in range(n)], dtype=np.uint64)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays.

    >>> jaccard(np.array([1, 2, 3]), np.array([2, 3, 4]))
    0.5
    """
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0




def _doc_text(conv: Conversation) -> list[str]:
    parts = []
    for m in conv.messages:
        if m.role == "system":
            continue
        parts.append(m.content)
        if m.tool_calls:
            parts.append(json.dumps(m.tool_calls, sort_keys=True, ensure_ascii=False))
    return parts


def lsh_params(threshold: float, num_perm: int = NUM_PERM, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) of the LSH: the most rows per band (fewest false candidates) with
    which a pair at ``threshold`` still becomes a candidate with probability ``recall``:
    1 - (1 - s^r)^b. (datasketch's own choice weighs misses and false candidates equally and
    finds only ~40% of the pairs at the threshold; here false candidates only cost an exact check.)

    >>> lsh_params(0.8), lsh_params(1.0)
    ((21, 6), (2, 64))
    """
    best = (num_perm // 2, 2)
    for r in range(2, num_perm // 2 + 1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            best = (b, r)
    return best


def segment_grams(segments: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, segment index of each) of the ``n``-grams of every segment, in one pass over the
    concatenated ids (a segment shorter than ``n`` gives its one whole-text hash, as ``gram_hashes``).

    >>> segs = [np.array([1, 2, 3, 4], dtype=np.uint64), np.array([], dtype=np.uint64), np.array([5], dtype=np.uint64)]
    >>> h, seg = segment_grams(segs, 3)
    >>> seg.tolist(), bool(h[0] == gram_hashes(segs[0], 3)[0]), bool(h[2] == gram_hashes(segs[2], 3)[0])
    ([0, 0, 2], True, True)
    """
    lens = np.array([len(x) for x in segments], dtype=np.int64)
    counts = np.where(lens >= n, lens - n + 1, 0)
    hashes = np.zeros(0, dtype=np.uint64)
    if counts.sum():
        flat = np.concatenate(segments)
        starts = np.cumsum(lens) - lens
        every = gram_hashes(flat, n)  # the windows that cross segments are skipped below
        first = np.repeat(starts - (np.cumsum(counts) - counts), counts)
        hashes = every[first + np.arange(int(counts.sum()))]
    seg = np.repeat(np.arange(len(segments)), counts)
    short = [i for i, k in enumerate(lens.tolist()) if 0 < k < n]
    if short:
        hashes = np.concatenate([hashes, np.array([gram_hashes(segments[i], n)[0] for i in short], dtype=np.uint64)])
        seg = np.concatenate([seg, np.array(short, dtype=np.int64)])
    return hashes, seg


def _group(values: np.ndarray, groups: np.ndarray, size: int) -> list[np.ndarray]:
    """``values`` split by their group (0..size-1), each group's values sorted and unique."""
    order = np.lexsort((values, groups))
    values, groups = values[order], groups[order]
    keep = np.r_[True, (values[1:] != values[:-1]) | (groups[1:] != groups[:-1])] if len(values) else []
    values, groups = values[keep], groups[keep]
    return np.split(values, np.searchsorted(groups, np.arange(1, size)))


def shingle_sets(texts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each row's word-shingle hashes (``Vocab.text`` of the row), sorted and unique: the sets
    whose Jaccard similarity decides near-duplicates."""
    empty = np.zeros(0, dtype=np.uint64)
    hashes, seg = segment_grams([np.concatenate([*t, empty]) for t in texts], SHINGLE)
    return _group(hashes, seg, len(texts))


def near_duplicates(convs: list[Conversation], threshold: float = NEAR_DUPLICATE_THRESHOLD,
                    texts: list[list[np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Rows whose shingle sets are at least ``threshold`` similar to an earlier row's."""
    from sft.data.formats import conversation_key

    if texts is None:
        vocab = Vocab()
        texts = [vocab.text(c) for c in convs]
    sets = shingle_sets(texts)
    first: dict[str, int] = {}  # conversation_key -> first row saying exactly that
    out: dict[int, dict[str, Any]] = {}
    searched = []  # rows that go into the LSH: not exact repeats, some text
    for i, conv in enumerate(convs):
        key = conversation_key(conv)
        if key in first:  # an exact duplicate: no need to search
            out[i] = {**loc(conv), "duplicate_of": loc(convs[first[key]]), "similarity": 1.0}
        else:
            first[key] = i
            if len(sets[i]):
                searched.append(i)
    for i, candidates in lsh_candidates([sets[i] for i in searched], threshold).items():
        for k in candidates:  # the earliest row that is similar enough
            j = searched[k]
            sim = jaccard(sets[searched[i]], sets[j])
            if sim >= threshold:
                out[searched[i]] = {**loc(convs[searched[i]]), "duplicate_of": loc(convs[j]), "similarity": round(sim, 4)}
                break
    return [out[i] for i in sorted(out)]


def lsh_candidates(sets: list[np.ndarray], threshold: float) -> dict[int, list[int]]:
    """For each row, the earlier rows that share a MinHash LSH band with it, sorted:
    ``datasketch`` MinHash signatures of the shingle hashes, cut into the bands of ``lsh_params``;
    rows whose band keys are equal in any band are candidates (the first MAX_CANDIDATES rows of
    each bucket). The bands are grouped with numpy: datasketch's MinHashLSH took 4x longer here."""
    from datasketch import MinHash

    bands, rows = lsh_params(threshold)
    base = MinHash(num_perm=NUM_PERM, seed=1, hashfunc=int)
    sig = np.zeros((len(sets), NUM_PERM), dtype=np.uint64)
    for i, sh in enumerate(sets):
        m = base.copy()
        m.update_batch((sh >> np.uint64(32)).tolist())  # datasketch hashes 32-bit values
        sig[i] = m.hashvalues
    with np.errstate(over="ignore"):
        keys = sig[:, : bands * rows].reshape(len(sets), bands, rows) @ _powers(rows)  # [rows, bands]
    found: dict[int, set[int]] = {}
    for b in range(bands):
        order = np.argsort(keys[:, b], kind="stable")  # rows of a bucket together, in reading order
        k = keys[order, b]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        for s, e in zip(starts.tolist(), ends.tolist()):
            if e - s > 1:
                members = order[s:e].tolist()
                for p in range(1, len(members)):
                    found.setdefault(members[p], set()).update(members[: min(p, MAX_CANDIDATES)])
    return {i: sorted(c) for i, c in found.items()}


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


def overlaps(eval_convs: list[Conversation], train: list[Conversation], vocab: Vocab,
             train_texts: list[list[np.ndarray]] | None = None, n: int = CONTAMINATION_N,
             min_overlap: float = CONTAMINATION_OVERLAP) -> dict[tuple[int, int], float]:
    """Every (eval row, training row) whose eval prompt or reply overlaps the training row by at
    least ``min_overlap`` (the larger of the two fields' overlaps): the pairs ``contamination``
    reports the best of, and ``sft.data.split`` keeps on one side."""
    index: dict[int, list[tuple[int, int]]] = {}  # gram -> [(eval row, field)]
    sizes: dict[tuple[int, int], int] = {}
    for e, conv in enumerate(eval_convs):
        for f, text in enumerate(_fields(conv)):
            toks = tokens(text)
            if sum(1 for t in toks if WORD.match(t)) < CONTAMINATION_MIN_WORDS:
                continue
            grams = set(gram_hashes(vocab(toks), n).tolist())
            sizes[(e, f)] = len(grams)
            for g in grams:
                index.setdefault(g, []).append((e, f))
    if not index:
        return {}
    if train_texts is None:
        train_texts = [vocab.text(c) for c in train]
    # every n-gram of every training message at once; only those that an eval text has go on
    owner = np.array([t for t, msgs in enumerate(train_texts) for _ in msgs], dtype=np.int64)
    hashes, seg = segment_grams([m for msgs in train_texts for m in msgs], n)
    hit = np.isin(hashes, np.fromiter(index, dtype=np.uint64, count=len(index)))
    pairs = np.unique(np.stack([owner[seg[hit]].astype(np.uint64), hashes[hit]], axis=1), axis=0)  # each gram once per row
    hits: dict[tuple[int, int, int], int] = {}  # (train row, eval row, field) -> shared grams
    for t, g in pairs.tolist():
        for e, f in index[g]:
            hits[(t, e, f)] = hits.get((t, e, f), 0) + 1
    out: dict[tuple[int, int], float] = {}  # (eval row, train row) -> overlap
    for (t, e, f), h in hits.items():
        overlap = h / sizes[(e, f)]
        if overlap >= min_overlap and overlap > out.get((e, t), 0.0):
            out[(e, t)] = overlap
    return out


def contamination(eval_convs: list[Conversation], train: list[Conversation], vocab: Vocab | None = None,
                  train_texts: list[list[np.ndarray]] | None = None, n: int = CONTAMINATION_N,
                  min_overlap: float = CONTAMINATION_OVERLAP) -> list[dict[str, Any]]:
    """Eval rows whose prompt or reply overlaps a training row (see the module docstring);
    ``train_texts``: ``vocab.text`` of each training row, when already computed."""
    found = overlaps(eval_convs, train, vocab or Vocab(), train_texts, n, min_overlap)
    best: dict[int, tuple[float, int]] = {}  # eval row -> (overlap, train row): the highest, then the earliest
    for (e, t), overlap in sorted(found.items()):
        if overlap > best.get(e, (0.0, 0))[0]:
            best[e] = (overlap, t)
    return [{"eval": loc(eval_convs[e]), "train": loc(train[t]), "overlap": round(ov, 4)}
            for e, (ov, t) in sorted(best.items())]
