"""The numpy hashing under near-duplicates and contamination (sft.data.minhash, sft.data.overlap):
tokens exactly as the regex finds them, MinHash agreement that tracks the Jaccard similarity, and
near-duplicate recall at the threshold, pinned."""

from __future__ import annotations

import random
import re

import numpy as np

from sft.data.minhash import EMPTY, lsh_pairs, signatures, word_hashes
from sft.data.overlap import _row_grams, contamination, jaccard, near_duplicates, shingle_sets, tokens
from sft.data.types import Conversation, Message

ALPHABET = "abcXYZ019_ .,;!?\n\t-+()[]{}'\"éÉßİ’…—中文字١٢\u00a0\u2003\u2028😀"


def test_word_hashes_tokenize_like_the_regex():
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        toks = tokens(text)
        h, n, word = word_hashes([text])
        assert n.tolist() == [len(toks)]
        assert h.tolist() == [int(word_hashes([t])[0][0]) for t in toks]  # a token hashes the same anywhere
        assert word.tolist() == [bool(re.match(r"\w", t)) for t in toks]
    h, _, _ = word_hashes(["Don't", "don ' t", "don't!"])
    assert h[:3].tolist() == h[3:6].tolist()  # case and spacing do not matter
    assert h[0] != h[2]  # control: different tokens differ


def rows(texts: list[str]) -> list[Conversation]:
    return [Conversation([Message("user", "q"), Message("assistant", t)], "t.jsonl", i + 1) for i, t in enumerate(texts)]


def pairs_at(rng: random.Random, n_pairs: int, length: int, changed: int) -> list[str]:
    words = [f"w{i}" for i in range(5000)]
    out = []
    for _ in range(n_pairs):
        a = [rng.choice(words) for _ in range(length)]
        b = list(a)
        for _ in range(changed):
            b[rng.randrange(length)] = f"x{rng.random()}"
        out += [" ".join(a), " ".join(b)]
    return out


def test_signature_agreement_tracks_jaccard():
    texts = pairs_at(random.Random(1), 200, 60, 4)
    convs = rows(texts)
    grams, seg = _row_grams(convs, 3, per_text=False)
    sig = signatures(grams, seg, len(convs))
    sets = shingle_sets(convs)
    exact = np.array([jaccard(sets[2 * k], sets[2 * k + 1]) for k in range(200)])
    agree = np.array([(sig[2 * k] == sig[2 * k + 1]).mean() for k in range(200)])
    assert round(float(exact.mean()), 4) == 0.6185 and round(float(agree.mean()), 4) == 0.6173
    assert round(float(abs(agree - exact).mean()), 4) == 0.033  # each pair's estimate is close, not just the mean
    unrelated = np.array([(sig[2 * k] == sig[2 * k + 2]).mean() for k in range(199)])
    assert unrelated.max() == 0.0  # control: different texts agree in no bin


def test_near_duplicate_recall_at_the_threshold():
    """1000 pairs of 101-word rows with 3 words changed: Jaccard 0.79-0.89 (LSH bands are set so
    that a pair at 0.8 is a candidate with probability 0.99)."""
    texts = pairs_at(random.Random(1), 1000, 100, 3)
    convs = rows(texts)
    sets = shingle_sets(convs)
    sims = np.array([jaccard(sets[2 * k], sets[2 * k + 1]) for k in range(1000)])
    found = {d["line"] for d in near_duplicates(convs)}
    hit = np.array([2 * k + 2 in found for k in range(1000)])
    assert int(((sims >= 0.8) & (sims < 0.85)).sum()) == 180
    assert int((sims >= 0.8).sum()) == 216 and int(hit[sims >= 0.8].sum()) == 216  # every pair at 0.8 or more
    assert int(hit[sims < 0.8].sum()) == 0  # and none below: each candidate is confirmed exactly
    assert found <= {2 * k + 2 for k in range(1000)}  # never a row of another pair


def test_lsh_pairs_and_empty_rows():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 3, 4], [EMPTY] * 4, [EMPTY] * 4], dtype=np.uint32)
    assert lsh_pairs(sig, 0.5).tolist() == [[1, 0], [2, 0]]
    assert lsh_pairs(sig, 0.5, max_candidates=0).tolist() == []
    blank = [Conversation([Message("user", " "), Message("assistant", t)], "t.jsonl", i + 1) for i, t in enumerate(["", "", "  "])]
    assert near_duplicates(blank) == [  # no words: only exact repeats
        {"file": "t.jsonl", "line": 2, "duplicate_of": {"file": "t.jsonl", "line": 1}, "similarity": 1.0}]


def test_contamination_counts_each_training_gram_once():
    reply = " ".join(f"w{i}" for i in range(16))  # 9 distinct 8-grams
    train = rows(["unrelated words only here", reply + " " + reply])  # each gram twice in one row
    half = rows([" ".join(f"w{i}" for i in range(8)) + " " + " ".join(f"v{i}" for i in range(8))])
    assert contamination(rows([reply]), train) == [
        {"eval": {"file": "t.jsonl", "line": 1}, "train": {"file": "t.jsonl", "line": 2}, "overlap": 1.0}]
    assert contamination(half, train) == []  # 1 of its 9 grams: below 0.5 (control)
