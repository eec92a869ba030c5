"""Turn regions in linear time: where a template renders every turn alike, the trained text of each
assistant turn is found from ONE rendering, not two renderings per turn (:mod:`sft.data.masks`).

Each content is replaced by a placeholder and the result split into template fragments; walking the
real rendering fragment, content, fragment, ... gives each content's span, and a trained turn is its
content through the next end-of-turn marker. :func:`regular` vouches for a template on probe
conversations; :func:`turn_regions` then checks each conversation: its rendering must walk
against the fragments of its *shape* (roles, names, which turns are trained; the fragments and the
exact per-turn regions of a placeholder conversation of that shape are computed once and cached),
else against its own placeholder rendering with its first and last trained turns checked against
the exact per-turn method; else None (the caller uses the exact method).
"""

from __future__ import annotations

import bisect
import re
from functools import lru_cache
from typing import Any

from sft.data.masks import end_of_turn, render, turn_texts
from sft.data.reasoning import open_reasoning, template_messages
from sft.data.types import Message
from sft.errors import SftError

Span = tuple[int, int]  # [start, end) in characters of the rendered text

# Placeholder i = OPEN + digits of i as private-use chars + CLOSE: no whitespace, never in real text.
_OPEN, _CLOSE, _DIGIT0 = "\ue000", "\ue001", 0xE010
_PLACEHOLDER_RE = re.compile("\ue000([\ue010-\ue019]+)\ue001")


def _placeholder(i: int) -> str:
    return _OPEN + "".join(chr(_DIGIT0 + int(d)) for d in str(i)) + _CLOSE


def _variants(content: str) -> list[str]:
    out: list[str] = []
    for v in (content, content.strip(), content.lstrip(), content.rstrip()):
        if v not in out:
            out.append(v)
    return out


def _walk(rendered: str, frags: list[str], order: list[int], contents: list[str]) -> list[Span] | None:
    """Match frags[0], contents[order[0]], frags[1], ... against ``rendered``; the span of each content.

    Backtracks over the trim variants when a choice leads nowhere (rare; bounded to stay linear).
    """
    if not rendered.startswith(frags[0]):
        return None
    n = len(order)
    spans: list[Span] = [(0, 0)] * n
    choice = [0] * n
    starts: list[int] = []
    k, pos, budget = 0, len(frags[0]), 8 * n + 64
    while k < n:
        options = _variants(contents[order[k]])
        placed = False
        while choice[k] < len(options) and budget > 0:
            v = options[choice[k]]
            choice[k] += 1
            budget -= 1
            end = pos + len(v)
            nxt = frags[k + 1]
            last_ok = k < n - 1 or end + len(nxt) == len(rendered)
            if rendered.startswith(v, pos) and rendered.startswith(nxt, end) and last_ok:
                spans[k] = (pos, end)
                starts.append(pos)
                pos, k, placed = end + len(nxt), k + 1, True
                break
        if not placed:
            if not starts or budget <= 0:
                return None
            choice[k] = 0
            k -= 1
            pos = starts.pop()
    return spans


def content_spans(
    tokenizer: Any, source: str, msgs: list[dict[str, Any]], tools: Any, rendered: str, where: str
) -> list[list[Span]] | None:
    """Per message, the char spans of its content in ``rendered``, or None when the template does
    more than copy (or trim) contents: render with a placeholder per content, split the result into
    template fragments, and walk ``rendered`` fragment, content, fragment, ... in linear time."""
    contents = [str(m.get("content") or "") for m in msgs]
    if any(_OPEN in c or _CLOSE in c for c in contents):
        return None
    masked = [{**m, "content": _placeholder(i)} for i, m in enumerate(msgs)]
    try:
        ph = render(tokenizer, source, masked, tools, False, where)
    except SftError:
        return None  # the template looks at content (e.g. validates it)
    parts = _PLACEHOLDER_RE.split(ph)
    frags = parts[0::2]
    order = [_index(d) for d in parts[1::2]]
    if any(i >= len(msgs) for i in order):
        return None
    spans = _walk(rendered, frags, order, contents)
    if spans is None:
        return None
    out: list[list[Span]] = [[] for _ in msgs]
    for i, span in zip(order, spans):
        out[i].append(span)
    return out


def fast_regions(spans: list[list[Span]], trained: list[int], rendered: str, marker: str) -> list[Span] | None:
    """Turn regions from content spans: each trained content through the first end-of-turn marker
    after it (tool calls written after the content included); None where that is not clear."""
    starts = sorted(s for per in spans for s, _ in per)
    out = []
    for i in trained:
        if len(spans[i]) != 1:
            return None
        s, e = spans[i][0]
        k = bisect.bisect_right(starts, s)
        at = rendered.find(marker, e, starts[k] if k < len(starts) else len(rendered))
        if at < 0:
            return None
        out.append((s, at + len(marker)))
    return out


_REGULAR_PROBES = [
    [Message("user", "Hi there"), Message("assistant", "Hello! How can I help?"), Message("user", "What is 2+2?"),
     Message("assistant", "4")],
    [Message("system", "Be brief."), Message("user", " Hi "), Message("assistant", " Hello! "),
     Message("user", "\nWhy?"), Message("assistant", "\nBecause.\n"), Message("user", "Ok"), Message("assistant", "Bye")],
]


@lru_cache(maxsize=16)
def regular(tokenizer: Any, source: str) -> bool:
    """Whether the linear-time content-span regions equal the exact per-turn regions on probe
    conversations (plain, system, whitespace, three turns), the conversation being one example."""
    marker = end_of_turn(tokenizer, source)
    if not marker:
        return False
    for probe in _REGULAR_PROBES:
        trained = [i for i, m in enumerate(probe) if m.role == "assistant"]
        view = template_messages(probe, set(), None)
        try:
            rendered = render(tokenizer, source, view, None, False, "data.template")
            turns = turn_texts(probe, tokenizer, source, None, "drop", trained, "data.template")
        except SftError:
            return False
        if not all(rendered.startswith(text[:end]) for _, text, _, end in turns):
            return False
        spans = content_spans(tokenizer, source, view, None, rendered, "data.template")
        if spans is None or fast_regions(spans, trained, rendered, marker) != [(s, e) for _, _, s, e in turns]:
            return False
    return True


def turn_regions(
    msgs: list[Message], tokenizer: Any, source: str, view: list[dict[str, Any]], tools: Any, rendered: str,
    trained: list[int], where: str,
) -> list[tuple[int, int]] | None:
    """Turn regions in linear time, for conversations of plain text (no reasoning, no tool calls or
    results, where templates branch) under a template that :func:`regular` vouches for (see the
    module docstring for the checks). None: use the exact method (two renderings per trained turn)."""
    plain = all(m.reasoning is None and not m.tool_calls and m.role != "tool" for m in msgs)
    if not trained or not plain or not regular(tokenizer, source):
        return None
    key = _shape_key(view, tools, trained)
    shape = _shape(tokenizer, source, key) if key is not None else None
    if shape is not None:  # one walk against the cached fragments of this shape: no other rendering
        frags, order = shape
        contents = [str(m.get("content") or "") for m in view]
        walked = None if any(_OPEN in c or _CLOSE in c for c in contents) else _walk(rendered, frags, order, contents)
        if walked is not None:
            per: list[list[Span]] = [[] for _ in view]
            for i, span in zip(order, walked):
                per[i].append(span)
            regions = fast_regions(per, trained, rendered, shape_marker(tokenizer, source))
            if regions is not None:
                return regions
    spans = content_spans(tokenizer, source, view, tools, rendered, where)
    marker = end_of_turn(tokenizer, source)
    regions = fast_regions(spans, trained, rendered, marker) if spans is not None and marker else None
    if regions is None:
        return None
    for k in {0, len(trained) - 1}:
        ((_, text, start, end),) = turn_texts(msgs, tokenizer, source, tools, "drop", [trained[k]], where, rendered)
        if (start, end) != regions[k] or not rendered.startswith(text[:end]):
            return None
    return regions


def shape_marker(tokenizer: Any, source: str) -> str:
    return end_of_turn(tokenizer, source) or ""


def _shape_key(view: list[dict[str, Any]], tools: Any, trained: list[int]) -> tuple[Any, ...] | None:
    """What the template sees of a conversation besides its contents, or None when that is more
    than roles and names (then the conversation is checked on its own)."""
    if tools is not None:
        return None
    out = []
    for m in view:
        rest = tuple(sorted((k, v) for k, v in m.items() if k != "content"))
        if any(k not in ("role", "name", "tool_call_id") or not isinstance(v, str) for k, v in rest):
            return None
        out.append(rest)
    return tuple(out), tuple(trained)


@lru_cache(maxsize=4096)
def _shape(tokenizer: Any, source: str, key: tuple[Any, ...]) -> tuple[list[str], list[int]] | None:
    """The template fragments and content order of a placeholder conversation of this shape, when
    its content-span regions equal its exact per-turn regions (and no generation prompt opens a
    reasoning block, where the exact method reads the turn's text); else None."""
    fields, trained = key
    msgs = [Message(**dict(f), content=_placeholder(i)) for i, f in enumerate(fields)]
    view = template_messages(msgs, set(), None)
    marker = end_of_turn(tokenizer, source)
    try:
        ph = render(tokenizer, source, view, None, False, "data.template")
        turns = turn_texts(msgs, tokenizer, source, None, "drop", list(trained), "data.template")
        prompts = [render(tokenizer, source, view[:i], None, True, "data.template") for i in trained]
    except SftError:
        return None
    if not marker or any(open_reasoning(p) is not None for p in prompts):
        return None
    parts = _PLACEHOLDER_RE.split(ph)
    frags, order = parts[0::2], [_index(d) for d in parts[1::2]]
    if any(i >= len(msgs) for i in order):
        return None
    spans = _walk(ph, frags, order, [m.content for m in msgs])
    if spans is None:
        return None
    per: list[list[Span]] = [[] for _ in msgs]
    for i, span in zip(order, spans):
        per[i].append(span)
    regions = fast_regions(per, list(trained), ph, marker)
    if regions != [(s, e) for _, _, s, e in turns] or not all(ph.startswith(t[:e]) for _, t, _, e in turns):
        return None
    return frags, order


def _index(digits: str) -> int:
    return int("".join(str(ord(c) - _DIGIT0) for c in digits))
