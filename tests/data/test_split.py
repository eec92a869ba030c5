"""eval.split by similarity (sft.data.split): near-duplicates on one side, no contamination."""

from __future__ import annotations

import random

import pytest

from sft.data.overlap import contamination, near_duplicates
from sft.data.split import hold_out_rows
from sft.data.types import Conversation, Message
from sft.errors import SftError

WORDS = ["apple", "river", "stone", "cloud", "lamp", "garden", "window", "bridge", "candle", "forest", "mirror",
         "pencil", "rocket", "saddle", "tunnel", "violin", "wagon", "yellow", "zebra", "anchor"]


def conv(user: str, reply: str, line: int) -> Conversation:
    c = Conversation([Message("user", user), Message("assistant", reply)])
    c.source, c.line = "d.jsonl", line
    return c


def text(i: int, n: int = 12) -> str:
    """A sentence of ``n`` words that no other ``i`` shares an 8-gram with."""
    rng = random.Random(i)
    return " ".join(f"{rng.choice(WORDS)}{rng.randrange(1000)}" for _ in range(n))


def pairs_rows(n_pairs: int) -> list[Conversation]:
    """Rows 2k and 2k+1 are near-duplicates (the second adds one word to a 24-word reply)."""
    rows = []
    for k in range(n_pairs):
        q, a = text(1000 + k), text(2000 + k, 24)
        rows += [conv(q, a, 2 * k + 1), conv(q + " please", a + " thanks", 2 * k + 2)]
    return rows


def sides(rows: list[Conversation], held: list[bool]) -> tuple[list[Conversation], list[Conversation]]:
    return [c for c, h in zip(rows, held) if not h], [c for c, h in zip(rows, held) if h]


def random_split(n: int, fraction: float, seed: int) -> list[bool]:
    """The old hold-out: single rows at random (the control)."""
    chosen = set(random.Random(seed).sample(range(n), round(n * fraction)))
    return [i in chosen for i in range(n)]


def test_near_duplicates_go_to_one_side():
    rows = pairs_rows(20)
    assert len(near_duplicates(rows)) == 20  # the data check's own test finds every pair
    split = hold_out_rows(rows, 0.2, seed=0)
    assert sum(split.held) == 8 and (split.groups, split.grouped_rows, split.kept_overlapping) == (4, 8, 0)
    assert all(split.held[2 * k] == split.held[2 * k + 1] for k in range(20))
    train, held = sides(rows, split.held)
    assert contamination(held, train) == []
    # control: a random single-row split puts pairs on both sides, and the data check sees it
    train, held = sides(rows, random_split(40, 0.2, seed=0))
    assert len(contamination(held, train)) >= 3


def test_shared_replies_stay_in_training():
    """Rows whose reply is a stock sentence overlap each other (the contamination test): none is
    held out, unless the whole group could be."""
    stock = "You're welcome! If you have any other questions, feel free to ask."
    rows = [conv(text(i), stock if i % 2 else text(500 + i, 20), i + 1) for i in range(40)]
    split = hold_out_rows(rows, 0.1, seed=3)
    train, held = sides(rows, split.held)
    assert len(held) == 4 and all(c.messages[-1].content != stock for c in held)
    assert split.kept_overlapping > 0 and contamination(held, train) == []
    train, held = sides(rows, random_split(40, 0.1, seed=3))  # control
    assert any(c.messages[-1].content == stock for c in held) and contamination(held, train)


def test_exact_copies_and_seed():
    rows = [conv(text(i), text(100 + i), i + 1) for i in range(10)] * 3  # each row 3 times
    a = hold_out_rows(rows, 0.3, seed=1)
    assert sum(a.held) == 9  # 3 of the 10 distinct rows, every copy
    assert all(a.held[i] == a.held[i + 10] == a.held[i + 20] for i in range(10))
    assert a.held == hold_out_rows(rows, 0.3, seed=1).held
    assert a.held != hold_out_rows(rows, 0.3, seed=2).held  # control: the seed picks the rows
    assert not any(hold_out_rows(rows, 0.0, seed=1).held)
    assert sum(hold_out_rows(rows[:2], 0.01, seed=0).held) == 1  # at least one row


def test_nothing_can_be_held_out_is_an_error():
    stock = "You're welcome! If you have any other questions, feel free to ask."
    rows = [conv(text(i), stock, i + 1) for i in range(10)]
    with pytest.raises(SftError, match=r"eval\.split: 0\.2: .* use eval\.data"):
        hold_out_rows(rows, 0.2, seed=0)
