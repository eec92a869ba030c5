"""A generated reply -> its reasoning and its final answer; plain-text stop markers; the chat view.

Reasoning models write a block before the answer (``<think>...</think>``, Magistral's
``[THINK]...[/THINK]``, gpt-oss's analysis channel). Evaluation scores the answer, and ``sft chat``
shows the two apart. A template whose end-of-turn marker is several text tokens (Phi-3.5's
``<|end|>`` without its special token, Mistral's ``</s>`` as text) has no stop id, so generation
also stops on the marker's text (:func:`cut_at_text`).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

BLOCKS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"), ("<thinking>", "</thinking>"))
HARMONY_ANALYSIS, HARMONY_FINAL = "<|channel|>analysis<|message|>", "<|channel|>final<|message|>"
# what sft chat shows apart: the blocks, and gpt-oss's analysis channel up to its final one
VIEW_BLOCKS = (*BLOCKS, (HARMONY_ANALYSIS, "<|end|><|start|>assistant" + HARMONY_FINAL))


def split_answer(raw: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a reply decoded WITH its special tokens. ``opened``: the
    prompt already opened the block (DeepSeek-R1's ``<think>\\n``), so the reply starts inside it;
    a reply that never closes its block has no answer.

    >>> split_answer("<think>\\n17 is odd.\\n</think>\\n\\nYes.")
    ('17 is odd.', 'Yes.')
    >>> split_answer("17 is odd.\\n</think>\\n\\nYes.", opened=True)
    ('17 is odd.', 'Yes.')
    >>> split_answer("17 is odd, and", opened=True)
    ('17 is odd, and', '')
    >>> split_answer("<|channel|>analysis<|message|>Odd.<|end|><|start|>assistant<|channel|>final<|message|>Yes.")
    ('Odd.', 'Yes.')
    >>> split_answer("Yes.")
    (None, 'Yes.')
    """
    if HARMONY_FINAL in raw:
        head, _, answer = raw.rpartition(HARMONY_FINAL)
        thought = head.partition(HARMONY_ANALYSIS)[2].partition("<|end|>")[0] if HARMONY_ANALYSIS in head else None
        return (thought.strip() if thought is not None else None), answer.strip()
    if raw.lstrip().startswith(HARMONY_ANALYSIS):  # still in the analysis channel when it stopped
        return raw.partition(HARMONY_ANALYSIS)[2].partition("<|end|>")[0].strip(), ""
    for open_tag, close_tag in BLOCKS:
        head, sep, tail = raw.partition(close_tag)
        if sep and (opened or head.lstrip().startswith(open_tag)):
            return head.lstrip().removeprefix(open_tag).strip(), tail.strip()
        if not sep and raw.lstrip().startswith(open_tag):
            return raw.lstrip().removeprefix(open_tag).strip(), ""
    return (raw.strip(), "") if opened else (None, raw.strip())


def strip_special(tokenizer: Any, text: str) -> str:
    """``text`` without the tokenizer's special tokens (an answer decoded with them)."""
    for tok in sorted(getattr(tokenizer, "all_special_tokens", []), key=len, reverse=True):
        if tok:
            text = text.replace(tok, "")
    return text.strip()


def cut_at_text(tokenizer: Any, ids: list[int], stops: list[str]) -> tuple[list[int], str | None]:
    """The ids before the first stop string in their decoding, and that string (None: none there).
    The kept ids are the longest prefix whose decoding ends at or before the marker."""
    if not stops or not ids:
        return ids, None
    text = tokenizer.decode(ids, skip_special_tokens=False)
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return ids, None
    at, stop = min(hits)
    lo, hi = 0, len(ids)
    while lo < hi:  # decoded length grows with the prefix
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) <= at:
            lo = mid
        else:
            hi = mid - 1
    return ids[:lo], stop


class ChatView:
    """Streams a reply to the terminal: reasoning dimmed under "(thinking)" (or only a note when
    ``hide``), then the answer; text from a plain-text stop marker on is never printed.

    Fed decoded text pieces in order (by a transformers streamer); :meth:`close` flushes.
    """

    def __init__(self, stops: list[str], opened: bool, hide: bool, out: TextIO | None = None) -> None:
        self.stops, self.hide, self.out = stops, hide, out or sys.stdout
        self.buf, self.done = "", False
        self.thinking = opened  # the prompt opened the block: the reply starts inside it
        self.trim = True  # drop whitespace at the start of the reasoning and of the answer
        if opened:
            self._note()

    def _note(self) -> None:
        self.out.write("(thinking hidden)" if self.hide else "\x1b[2m(thinking) ")

    def feed(self, piece: str) -> None:
        if self.done:
            return
        self.buf += piece
        for s in self.stops:  # stop at a plain-text end-of-turn marker
            if s in self.buf:
                self.buf, self.done = self.buf[: self.buf.index(s)], True
        keep = 0 if self.done else max((len(s) - 1 for s in self.stops), default=0)
        for open_tag, close_tag in VIEW_BLOCKS:  # hold back what may be the start of a tag
            keep = max(keep, 0 if self.done else len(close_tag) - 1)
            if not self.thinking and self.buf.lstrip().startswith(open_tag):
                self.buf, self.thinking, self.trim = self.buf.lstrip()[len(open_tag):], True, True
                self._note()
            if self.thinking and close_tag in self.buf:
                thought, _, self.buf = self.buf.partition(close_tag)
                self._write(thought.lstrip() if self.trim else thought.rstrip())
                self.out.write("\n" if self.hide else "\x1b[0m\n")
                self.thinking, self.trim = False, True
        if self.trim:
            self.buf = self.buf.lstrip()
            self.trim = not self.buf
        cut = len(self.buf) - keep if keep else len(self.buf)
        if cut > 0:
            self._write(self.buf[:cut])
            self.buf = self.buf[cut:]

    def _write(self, text: str) -> None:
        if not (self.thinking and self.hide):
            self.out.write(text)
        self.out.flush()

    def close(self) -> None:
        if not self.done:
            self._write(self.buf)
        if self.thinking and not self.hide:
            self.out.write("\x1b[0m")
        self.buf = ""
        self.out.write("\n")
        self.out.flush()
