"""Text -> word hashes -> n-gram hashes -> MinHash signatures -> LSH candidate pairs, in numpy.

Every step works on flat arrays for many texts at once, so the time is linear in the characters
and no Python code runs per word (``sft.data.overlap`` builds near-duplicates and contamination on
it):

- ``word_hashes``: the lower-cased texts are tokenized like the regex ``\\w+|[^\\w\\s]`` (runs of
  word characters, each other non-space character alone; ``\\w`` and ``\\s`` exactly as Python's
  ``re`` has them, Unicode included) over the code points of all texts joined, and each token gets
  a 64-bit polynomial hash of its code points from one prefix sum (hashes, not a vocabulary:
  the same token has the same hash in every file and every run, which per-source caching needs).
- ``gram_hashes``: the ``n``-grams of each segment (a text, or a row's texts together).
- ``signatures``: one-permutation MinHash (Li, Owen & Zhang 2012) with optimal densification
  (Shrivastava 2017): each n-gram hash falls in one of ``NUM_PERM`` bins and a bin keeps its
  smallest value; an empty bin borrows the value of the first non-empty bin of a probe sequence
  that is the same for every row. Two rows agree in a bin with probability equal to the Jaccard
  similarity of their n-gram sets, as with ``NUM_PERM`` independent permutations, at the cost of
  one hash per n-gram instead of ``NUM_PERM``.
- ``band_keys``, ``band_pairs``, ``lsh_pairs``: the signature cut into bands, one 64-bit key per
  band; rows whose keys are equal in any band are candidate pairs (sort per band, no Python dict
  of sets).
"""

from __future__ import annotations

import functools

import numpy as np

NUM_PERM = 128  # MinHash bins per signature
EMPTY = np.uint32(0xFFFFFFFF)  # a bin no n-gram fell in
MAX_CANDIDATES = 100  # earlier rows of one LSH bucket paired with a row (bounds the time on templated data)
_P = np.uint64(0x100000001B3)  # odd: invertible mod 2^64
_P_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_SPACE, _WORD, _PUNCT = 0, 1, 2


def _fmix(h: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser (in place), so nearby hashes spread over all bits."""
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h


def _char_class(cp: int) -> int:
    ch = chr(cp)
    if ch.isalnum() or ch == "_":  # re's \w for str patterns
        return _WORD
    return _SPACE if ch.isspace() else _PUNCT


@functools.lru_cache(maxsize=1)
def _ascii_classes() -> np.ndarray:
    return np.array([_char_class(c) for c in range(128)], dtype=np.uint8)


def _classes(cps: np.ndarray) -> np.ndarray:
    if not len(cps) or int(cps.max()) < 128:
        return _ascii_classes()[cps]
    cls = np.empty(len(cps), dtype=np.uint8)
    low = cps < 128
    cls[low] = _ascii_classes()[cps[low]]
    if not low.all():  # the few distinct non-ASCII code points, classified one by one
        high = cps[~low]
        uniq, inv = np.unique(high, return_inverse=True)
        cls[~low] = np.array([_char_class(int(c)) for c in uniq], dtype=np.uint8)[inv]
    return cls


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """[1, base, base^2, ...] mod 2^64, ``n`` of them."""
    out = np.full(n, base, dtype=np.uint64)
    if n:
        out[0] = 1
        with np.errstate(over="ignore"):
            np.cumprod(out, out=out)
    return out


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash of each token uint64 [T], tokens per text int64 [len(texts)], token is a word bool [T])
    of the lower-cased ``texts``, tokenized like ``re.findall(r"\\w+|[^\\w\\s]", text.lower())``.

    >>> h, n, word = word_hashes(["What is 2+2?", "", "what IS"])
    >>> n.tolist(), word.tolist()
    ([6, 0, 2], [True, True, True, False, True, False, True, True])
    >>> bool(h[0] == h[6]) and bool(h[1] == h[7]) and bool(h[2] == h[4]) and bool(h[0] != h[1])
    True
    """
    lows = [t.lower() for t in texts]
    joined = "\n".join(lows)  # a space between texts: no token crosses two texts
    cps = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    cls = _classes(cps)
    word = cls == _WORD
    prev_word = np.r_[False, word[:-1]]
    next_word = np.r_[word[1:], False]
    punct = cls == _PUNCT
    starts = np.flatnonzero(punct | (word & ~prev_word))
    ends = np.flatnonzero(punct | (word & ~next_word))  # inclusive; pairs with starts in order
    # hash of cps[s..e] = sum cps[i] P^(e-i) = P^e * (S[e] - S[s-1]) with S = cumsum(cps[i] P^-i)
    with np.errstate(over="ignore"):
        pref = np.cumsum(cps * _powers(_P_INV, len(cps)))
        before = np.where(starts > 0, pref[np.maximum(starts - 1, 0)], np.uint64(0))
        h = (pref[ends] - before) * _powers(_P, len(cps))[ends]
    text_starts = np.cumsum([0] + [len(t) + 1 for t in lows[:-1]]) if lows else np.zeros(0, np.int64)
    owner = np.searchsorted(text_starts, starts, side="right") - 1
    counts = np.bincount(owner, minlength=len(texts)).astype(np.int64)
    return _fmix(h), counts, word[starts]


@functools.lru_cache(maxsize=64)
def _gram_powers(n: int) -> tuple[np.uint64, ...]:
    return tuple(np.uint64(pow(0x9E3779B97F4A7C15, n - 1 - k, 1 << 64)) for k in range(n))


def gram_hashes(ids: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64, segment of each int64) of the ``n``-grams of each segment of ``ids`` (segment
    ``k`` is the next ``lengths[k]`` values); a segment shorter than ``n`` gives one hash of its
    whole text (its length mixed in, so it is no true n-gram), an empty one none.

    >>> ids = np.array([1, 2, 3, 4, 1, 2, 3, 9], dtype=np.uint64)
    >>> h, seg = gram_hashes(ids, np.array([4, 0, 3, 1]), 3)
    >>> seg.tolist(), bool(h[0] == h[2]), bool(h[0] == h[1])
    ([0, 0, 2, 3], True, False)
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    counts = np.where(lengths >= n, lengths - n + 1, (lengths > 0).astype(np.int64))
    total = int(counts.sum())
    seg = np.repeat(np.arange(len(lengths)), counts)
    if total == 0:
        return np.zeros(0, np.uint64), seg
    # window start of every gram; a short segment's one "gram" is its whole text, padded with
    # a marker of its length
    first = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(total)
    width = np.minimum(lengths[seg], n)
    padded = np.r_[ids, np.zeros(n, np.uint64)]
    h = np.zeros(total, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k, power in enumerate(_gram_powers(n)):
            term = np.where(k < width, padded[np.minimum(first + k, len(ids))], np.uint64(1_000_003) + width.astype(np.uint64))
            h += term * power
    return _fmix(h), seg


def signatures(hashes: np.ndarray, seg: np.ndarray, rows: int, num_perm: int = NUM_PERM) -> np.ndarray:
    """MinHash signatures uint32 [rows, num_perm] of the n-gram ``hashes`` of each row (``seg``);
    a row without n-grams is all ``EMPTY``.

    >>> h = np.array([5, 9, 300, 5, 9, 300, 7], dtype=np.uint64) << np.uint64(40)
    >>> sig = signatures(_fmix(h), np.array([0, 0, 0, 1, 1, 1, 2]), 4)
    >>> bool((sig[0] == sig[1]).all()), float((sig[0] == sig[2]).mean()) < 0.5, bool((sig[3] == EMPTY).all())
    (True, True, True)
    """
    bits = np.uint64(64 - int(num_perm).bit_length() + 1)  # num_perm is a power of two
    flat = np.full(rows * num_perm, EMPTY, dtype=np.uint32)
    np.minimum.at(flat, seg * num_perm + (hashes >> bits).astype(np.int64), (hashes & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    return _densify(flat.reshape(rows, num_perm))


def _densify(sig: np.ndarray) -> np.ndarray:
    """Fill each empty bin of a row that has some non-empty one with the value of the first
    non-empty bin of its probe sequence (the same sequence for every row), in place."""
    num_perm = sig.shape[1]
    filled = sig != EMPTY
    has = filled.any(axis=1)
    r, j = np.nonzero(~filled & has[:, None])
    out_r, out_j, val = [], [], []
    attempt = 0
    while len(r):
        attempt += 1
        probe = _fmix((j.astype(np.uint64) << np.uint64(32)) | np.uint64(attempt))
        c = (probe % np.uint64(num_perm)).astype(np.int64)
        got = filled[r, c]
        out_r.append(r[got])
        out_j.append(j[got])
        val.append(sig[r[got], c[got]])
        r, j = r[~got], j[~got]
    if out_r:
        sig[np.concatenate(out_r), np.concatenate(out_j)] = np.concatenate(val)
    return sig


def lsh_params(threshold: float, num_perm: int = NUM_PERM, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band) of the LSH: the most rows per band (fewest false candidates) with
    which a pair at ``threshold`` still becomes a candidate with probability ``recall``:
    1 - (1 - s^r)^b.

    >>> lsh_params(0.8), lsh_params(1.0)
    ((21, 6), (2, 64))
    """
    best = (num_perm // 2, 2)
    for r in range(2, num_perm // 2 + 1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            best = (b, r)
    return best


def band_keys(sig: np.ndarray, threshold: float) -> np.ndarray:
    """One 64-bit key per band of ``lsh_params(threshold)`` for each signature, uint64 [rows, bands]:
    what the LSH compares (168 bytes a row at 0.8 instead of the signature's 512, so a million rows'
    keys are held, not their signatures).

    >>> band_keys(np.array([[1, 2, 3, 4], [1, 2, 9, 9]], dtype=np.uint32), 0.5).shape
    (2, 2)
    """
    n, num_perm = sig.shape
    bands, width = lsh_params(threshold, num_perm)
    out = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            cols = sig[:, b * width : (b + 1) * width].astype(np.uint64)
            key = np.zeros(n, dtype=np.uint64)
            for k in range(width):
                key = _fmix(key * np.uint64(0x9E3779B97F4A7C15) + cols[:, k])
            out[:, b] = key
    return out


def band_pairs(keys: np.ndarray, max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """Candidate pairs int64 [P, 2] (later row, earlier row), sorted, of rows whose ``band_keys``
    are equal in some band; in a bucket each row is paired with its first ``max_candidates`` rows.

    >>> band_pairs(np.array([[5, 1], [5, 2], [6, 2]], dtype=np.uint64)).tolist()
    [[1, 0], [2, 1]]
    """
    n = len(keys)
    codes = np.zeros(0, dtype=np.int64)  # later * n + earlier
    for b in range(keys.shape[1] if keys.ndim == 2 else 0):
        key = np.ascontiguousarray(keys[:, b])
        order = np.argsort(key, kind="stable")  # a bucket's rows together, in reading order
        k_sorted = key[order]
        run_start = np.flatnonzero(np.r_[True, k_sorted[1:] != k_sorted[:-1]])
        run_len = np.diff(np.r_[run_start, len(order)])
        pos = np.arange(len(order)) - np.repeat(run_start, run_len)  # position in its bucket
        reps = np.minimum(pos, max_candidates)
        total = int(reps.sum())
        if total == 0:
            continue
        later = np.repeat(np.arange(len(order)), reps)
        k = np.arange(total) - np.repeat(np.cumsum(reps) - reps, reps)
        earlier = np.repeat(np.repeat(run_start, run_len), reps) + k
        codes = np.union1d(codes, order[later] * n + order[earlier])
    return np.stack([codes // max(n, 1), codes % max(n, 1)], axis=1)


def lsh_pairs(sig: np.ndarray, threshold: float, max_candidates: int = MAX_CANDIDATES) -> np.ndarray:
    """Candidate pairs int64 [P, 2] (later row, earlier row), sorted, of rows whose signatures are
    equal in some band of ``lsh_params(threshold)`` (``band_keys``, ``band_pairs``). Rows whose
    signature is all ``EMPTY`` take no part.

    >>> s = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [EMPTY] * 4, [EMPTY] * 4], dtype=np.uint32)
    >>> lsh_pairs(s, 0.5).tolist()  # 2 bands of 2 at this size
    [[1, 0], [2, 0]]
    """
    live = np.flatnonzero(sig[:, 0] != EMPTY)  # densified: a row with n-grams fills every bin
    pairs = band_pairs(band_keys(sig[live], threshold), max_candidates)
    return live[pairs].reshape(-1, 2)
