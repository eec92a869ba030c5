"""Rendered chat -> which characters (then tokens) are trained: turn regions and end-of-turn markers.

The trained text of assistant turn ``i`` is defined by what inference does:

- ``P`` = render(messages[:i], add_generation_prompt=True): what the model is given;
- ``F`` = render(messages[:i + 1]): the conversation that ends with the turn;
- the turn starts where ``P`` and ``F`` part (``len(P)`` when ``P`` is a prefix of ``F``; a
  template whose generation prompt adds text that turns never render, like DeepSeek-R1's
  ``<think>\\n``, parts earlier) and ends with the template's end-of-turn marker (the last one
  in ``F``), so reasoning, tool calls and any template text between prompt and content are
  trained exactly as rendered, and text a template appends after the last turn only is not;
- a template that renders the history itself differently when a reply follows (Mistral writes
  the system prompt only into the last user turn) gets ``P`` followed by the turn as its example.

If every ``F[:end]`` is a prefix of the full rendering, the conversation is one example with a
trained region per turn. Otherwise (Qwen3 drops reasoning from earlier turns and adds an empty
``<think>`` block to the last one) each turn is its own example ``F``: history as inference renders
it, so training equals inference by construction. Regions are character spans; a token is trained
if it overlaps one. Masks never depend on token ids (SmolLM2's pad == eos).
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from typing import Any

from sft.data.reasoning import (
    closes_empty_block,
    kept_reasoning,
    open_reasoning,
    reasoning_field,
    renders_block,
    template_messages,
    thought_after_open,
)
from sft.data.render import compiled, plain
from sft.data.types import Message
from sft.errors import SftError

Span = tuple[int, int]  # [start, end) in characters of the rendered text


def render(tokenizer: Any, source: str, messages: list[dict[str, Any]], tools: Any, gen: bool, where: str) -> str:
    """``apply_chat_template(tokenize=False)``; template errors become one-line SftErrors.

    Tool-call arguments are objects (as most templates want); a template that fails on them is
    given OpenAI's JSON strings instead (DeepSeek-R1's writes ``'...' + arguments``).
    """
    if not messages:
        return ""
    if plain(messages, tools) and (fast := compiled(tokenizer, source)) is not None:
        try:
            return fast(messages, gen)
        except Exception:  # the ordinary call below makes the error (or the retry)
            pass
    try:
        out = tokenizer.apply_chat_template(
            messages, chat_template=source, tools=tools, add_generation_prompt=gen, tokenize=False
        )
    except Exception as e:  # jinja2 errors, raise_exception(...) in the template
        strung = _string_arguments(messages)
        if strung is not None:
            try:
                return render(tokenizer, source, strung, tools, gen, where)
            except SftError:
                pass
        raise SftError(
            f"{where}: the chat template failed on this conversation: {e}; "
            "fix the row or choose another data.template"
        ) from None
    return str(out)


def _string_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``messages`` with every object tool-call argument as its JSON text, or None if none is."""
    changed, out = False, []
    for m in messages:
        calls = []
        for call in m.get("tool_calls") or []:
            fn = call.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), dict):
                call = {**call, "function": {**fn, "arguments": json.dumps(fn["arguments"], ensure_ascii=False)}}
                changed = True
            calls.append(call)
        out.append({**m, "tool_calls": calls} if calls else m)
    return out if changed else None


def tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """Token ids exactly as apply_chat_template(tokenize=True) makes them, with char offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise SftError("model: exact loss masks need a fast (Rust) tokenizer with offset mappings")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def tokenize_apart(tokenizer: Any, text: str, cuts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and char offsets of ``text`` tokenized piece by piece between ``cuts``."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    bounds = [0, *sorted(cuts), len(text)]
    for a, b in itertools.pairwise(bounds):
        piece_ids, piece_offsets = tokenize(tokenizer, text[a:b])
        ids += piece_ids
        offsets += [(a + x, a + y) for x, y in piece_offsets]
    return ids, offsets


@lru_cache(maxsize=8)
def special_ids(tokenizer: Any) -> frozenset[int]:
    """Special ids and added special tokens (Gemma's <end_of_turn> is only the latter)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(ids)


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search on C-speed slice compares).

    >>> common_prefix("<s>user: hi<a>", "<s>user: hi<a><think>")
    14
    """
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix(a: str, b: str) -> int:
    """Length of the longest common suffix.

    >>> common_suffix("Hello<|end|>\\n", "4<|end|>\\n")
    8
    """
    return common_prefix(a[::-1], b[::-1])


def _special_end(tokenizer: Any, text: str, first: bool = False) -> int | None:
    """End (in chars) of the last (``first``: the first) special token in ``text``, or None."""
    ids, offsets = tokenize(tokenizer, text)
    special = special_ids(tokenizer)
    ends = [e for t, (_, e) in zip(ids, offsets) if t in special]
    return (ends[0] if first else ends[-1]) if ends else None


_PROBE_A = ("Hello! How can I help?", "4")


@lru_cache(maxsize=16)
def end_of_turn(tokenizer: Any, source: str) -> str | None:
    """The text a template writes after every assistant turn's content, or None if there is none.

    It is what follows the content both when the turn is last (``X``) and when a user turn follows
    (``Y``): their common prefix, cut after its last special token, or else at whitespace. That
    excludes what a template appends once after the last turn (Phi-3.5's EOS) and the separator
    before the next header (ChatML's newline). Results: ``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ``<|end|>``, ``</s>``.
    """
    first, second = _PROBE_A
    probe = [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": second},
    ]
    where = "data.template"
    last = render(tokenizer, source, probe[:2], None, False, where)
    other = render(tokenizer, source, [probe[0], {"role": "assistant", "content": second}], None, False, where)
    x = last[len(last) - common_suffix(last, other):]
    full = render(tokenizer, source, probe, None, False, where)
    at = full.find(first)
    raw = x
    if at >= 0:
        y = full[at + len(first):]
        raw = x[: common_prefix(x, y)]
    if raw != x:  # a partial match ("<|end|>\n<|" of "<|end|>\n<|endoftext|>" and "<|end|>\n<|user|>")
        keep = max(_special_end(tokenizer, raw) or 0, max(raw.rfind(c) for c in " \n\t") + 1)
        # nothing whole in common (gpt-oss ends the last turn with <|return|>, history with <|end|>):
        # the last turn's first special token, which the model writes to end its reply
        opening = _special_end(tokenizer, x, first=True)
        raw = raw[:keep] if keep else (x[:opening] if opening else raw)
    raw = raw.rstrip()
    special = _special_end(tokenizer, raw) if raw else None
    if special is not None:
        raw = raw[:special]
    return raw or None


def aligned_tail(a: str, b: str) -> int:
    """Length of the longest suffix of ``a`` that ``b`` starts with.

    >>> aligned_tail("Sys.\\n\\nHi[/INST]", "Hi[/INST]Hello!</s>")
    9
    """
    p = a.find(b[:1]) if b else -1
    while p >= 0:
        if b.startswith(a[p:]):
            return len(a) - p
        p = a.find(b[:1], p + 1)
    return 0


def tag_boundary(prompt: str, char: int) -> int:
    """Back ``char`` off to just after the prompt's last ``>``/whitespace/``]`` (tags end there): the
    prompt's "<think>" and a turn's "<｜tool▁calls▁begin｜>" share a "<" that belongs to the turn.

    >>> tag_boundary("<｜Assistant｜><think>", len("<｜Assistant｜><"))
    13
    """
    if char == 0 or prompt[char - 1] in ">]\n ":
        return char
    back = max(prompt.rfind(c, 0, char) for c in ">]\n ")
    return back + 1 if back >= 0 else char


def turn_region(full: str, start: int, marker: str | None) -> int:
    """End of the turn that starts at ``start`` in ``full`` (the conversation ending with that turn):
    the end of the last end-of-turn marker, else the end of the non-blank text."""
    if marker:
        at = full.rfind(marker, start)
        if at >= 0:
            return at + len(marker)
    return max(start, len(full.rstrip()))


Turn = tuple[int, str, int, int]  # (message index, rendered text ending with it, start, end)


def turn_texts(
    messages: list[Message], tokenizer: Any, source: str, tools: Any, reasoning: str, indexes: list[int], where: str,
    whole: str | None = None,
) -> list[Turn]:
    """For each message index: the conversation rendered up to it (history as inference renders it)
    and the [start, end) characters of its turn there (see sft.data.masks). ``whole``: the
    rendering of all ``messages`` in that same view, if the caller has it."""
    field = reasoning_field(source)
    marker = end_of_turn(tokenizer, source)
    out = []
    for i in indexes:
        view = template_messages(messages[: i + 1], kept_reasoning(messages, reasoning, i), field)
        prompt = render(tokenizer, source, view[:i], tools, messages[i].role == "assistant", where)
        last = whole is not None and i == len(messages) - 1
        text = whole if last and whole is not None else render(tokenizer, source, view, tools, False, where)
        start = common_prefix(prompt, text)
        if start < len(prompt):  # the prompt is not how the template renders the history it continues
            before = messages[i - 1].content.strip() if i else ""
            k = aligned_tail(prompt[start:], text[start:])
            if before and before in prompt[len(prompt) - k:]:
                # history rendered differently (Mistral writes the system prompt only into the last
                # user turn): the example is the prompt as inference gives it, then the turn
                text, start = prompt + text[start + k:], len(prompt)
            else:  # the prompt adds text that turns never render (an unknown opening tag)
                start = tag_boundary(prompt, start)
        end = turn_region(text, start, marker)
        m = messages[i]
        opened = open_reasoning(prompt) if m.role == "assistant" else None
        if m.role == "assistant" and m.reasoning and i in kept_reasoning(messages, reasoning, i) \
                and closes_empty_block(prompt):
            raise SftError(
                f"{where}: messages[{i}] has reasoning, but the template's generation prompt closes an empty "
                f"reasoning block ({prompt[-24:]!r}: thinking is off), so inference never asks for it; enable "
                "thinking in data.template_kwargs, or drop the reasoning (data.reasoning: drop)")
        if opened is not None:
            shown = m.reasoning if i in kept_reasoning(messages, reasoning, i) else None
            if not text.startswith(prompt) or not renders_block(text[start:end], shown, opened[2]):
                # the generation prompt opens a reasoning block that the template does not render in
                # the turn (DeepSeek-R1 cuts everything up to </think>): the model writes the
                # reasoning and the closing tag, then the turn as the template renders it without
                # reasoning, after the prompt, as inference has it
                bare = render(tokenizer, source, [*view[:i], m.to_template(reasoning=False)], tools, False, where)
                head = tag_boundary(prompt, common_prefix(prompt, bare))
                body = bare[head:turn_region(bare, head, marker)]
                if body.lstrip().startswith(opened[2]):  # the template closes an empty block itself
                    body = body.lstrip()[len(opened[2]):].lstrip()
                text = prompt + thought_after_open(m, shown, opened) + body
                start, end = len(prompt), len(text)
        out.append((i, text, start, end))
    return out


def labels_for(ids: list[int], offsets: list[Span], regions: list[Span], ignore: int) -> list[int]:
    """ids where a token overlaps a region, else ``ignore``; one sweep (both lists sorted)."""
    labels = [ignore] * len(ids)
    r = 0
    for t, (ts, te) in enumerate(offsets):
        while r < len(regions) and regions[r][1] <= ts:
            r += 1
        if r < len(regions) and ts < regions[r][1] and te > regions[r][0]:
            labels[t] = ids[t]
    return labels
