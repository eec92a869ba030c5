"""Which training rows are held out for evaluation (``eval.split``), so that no held-out row is
trained on in another form.

A random hold-out of single rows leaks: a near-copy of a held-out row (same question, other
numbers) or a row with the same prompt or the same reply stays in training, and the score is
partly measured on training data (``sft data check`` reports it as contamination). So rows are
held out by group, with the two tests ``sft data check`` uses (``sft.data.overlap``, same
thresholds):

1. Groups: exact copies (``conversation_key``) and near-duplicates (word 3-shingle Jaccard at
   least ``threshold``, the ``data.quality.near_duplicate_threshold``, found with MinHash LSH)
   linked transitively. A group goes to one side whole.
2. Groups are drawn in a seeded order until ``fraction`` of the distinct rows is held out. A drawn
   group whose prompt or reply overlaps a row that stays in training (the contamination test:
   half of its word 8-grams in that row) stays in training too, and the next group is drawn; a
   group larger than what is left to hold out is passed over.

So the held-out side has no contamination with the training side by construction. Pure functions
on lists of conversations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from sft.data.formats import conversation_key
from sft.data.overlap import NEAR_DUPLICATE_THRESHOLD, overlaps, row_bands, similar_pairs
from sft.data.types import Conversation, Message  # noqa: F401 (Message: the doctest)
from sft.errors import SftError


@dataclass
class Holdout:
    held: list[bool]  # per input row: held out for evaluation
    groups: int = 0  # near-duplicate groups (2 or more distinct rows) held out whole
    grouped_rows: int = 0  # distinct rows in those groups
    kept_overlapping: int = 0  # drawn rows left in training: their prompt or reply overlaps a training row


def near_duplicate_groups(convs: list[Conversation], threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[int]:
    """Group of each row (numbered by first row): rows whose word 3-shingle sets are at least
    ``threshold`` similar, linked transitively. A row without text is its own group.

    >>> def c(text): return Conversation([Message("user", "q"), Message("assistant", text)])
    >>> rows = [c("a b c d e f g h i j"), c("x"), c("a b c d e f g h i k"), c("a b c d e f g h i j k")]
    >>> near_duplicate_groups(rows, threshold=0.75), near_duplicate_groups(rows, threshold=0.85)
    ([0, 1, 0, 0], [0, 1, 2, 0])
    """
    parent = list(range(len(convs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bands, live = row_bands(convs, threshold)
    searched = np.flatnonzero(live)
    for later, earlier, _ in similar_pairs([convs[i] for i in searched.tolist()], bands[searched], threshold,
                                           first_only=False):
        a, b = find(int(searched[later])), find(int(searched[earlier]))
        parent[max(a, b)] = min(a, b)
    number: dict[int, int] = {}
    return [number.setdefault(find(i), len(number)) for i in range(len(convs))]


def hold_out_rows(convs: list[Conversation], fraction: float, seed: int,
                  threshold: float = NEAR_DUPLICATE_THRESHOLD) -> Holdout:
    """The rows of ``convs`` to hold out (see the module docstring): ``fraction`` of the distinct
    conversations (at least one when ``fraction > 0`` and there are two or more), fewer only
    when no other group fits. Raises SftError when no row can be held out without contamination.
    """
    if fraction <= 0:
        return Holdout([False] * len(convs))
    from sft.data.rows import materialize

    keys = [conversation_key(c) for a in range(0, len(convs), 2048) for c in materialize(convs[a : a + 2048])]
    first = list(dict.fromkeys(keys))  # distinct conversations, in reading order
    if len(first) < 2:
        return Holdout([False] * len(convs))
    row_of = {k: i for i, k in reversed(list(enumerate(keys)))}
    distinct = [convs[row_of[k]] for k in first]
    n = len(distinct)
    want = min(n - 1, max(1, round(n * fraction)))
    group = near_duplicate_groups(distinct, threshold)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    order = list(members)
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    out = Holdout([])
    pos, batch_size = 0, 2 * want + 8
    while len(held) < want and pos < len(order):
        batch = order[pos : pos + batch_size]  # overlaps are found for a batch of drawn groups at once
        pos, batch_size = pos + len(batch), batch_size * 2
        rows = [i for g in batch for i in members[g]]
        touches: dict[int, set[int]] = {i: set() for i in rows}  # drawn row -> rows its prompt or reply overlaps
        for (e, t), _ in overlaps([distinct[i] for i in rows], distinct).items():
            touches[rows[e]].add(t)
        for g in batch:
            if len(held) + len(members[g]) > want:
                continue
            inside = held | set(members[g])
            if any(t not in inside for i in members[g] for t in touches[i]):
                out.kept_overlapping += len(members[g])
                continue
            held = inside
            if len(members[g]) > 1:
                out.groups += 1
                out.grouped_rows += len(members[g])
    if not held:
        raise SftError(f"eval.split: {fraction:g}: every row drawn for evaluation has a near-duplicate, or a prompt "
                       "or reply that overlaps a training row, so none can be held out without measuring on "
                       "training data; use eval.data with separate evaluation rows")
    held_keys = {first[i] for i in held}
    out.held = [k in held_keys for k in keys]
    return out
