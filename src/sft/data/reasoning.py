"""Reasoning in chat templates: which field a template reads it from, which turns show it, and
what the model writes after a generation prompt that opens a reasoning block (DeepSeek-R1's
``<think>\n``), used by :mod:`sft.data.masks` for each trained turn.
"""

from __future__ import annotations

import re
from typing import Any

from sft.data.types import Message
from sft.errors import SftError

REASONING = ("keep_last", "keep_all", "drop")
THINK = "<think>\n{}\n</think>\n\n"  # how reasoning is written into content for templates that ignore the field


def reasoning_field(source: str) -> str | None:
    """The message field a template renders reasoning from: ``reasoning_content`` (Qwen3, DeepSeek
    V3.1), ``chunks`` (Magistral: a ``{"type": "thinking"}`` block in a content list), ``thinking``
    (gpt-oss), or None (sft then writes it into the content as <think> text).

    >>> reasoning_field("{{ message.reasoning_content }}"), reasoning_field("{{ message.thinking }}")
    ('reasoning_content', 'thinking')
    >>> reasoning_field("{% if block['type'] == 'thinking' %}{{ block['thinking'] }}{% endif %}")
    'chunks'
    >>> reasoning_field("{{ message.content }}") is None
    True
    """
    if "reasoning_content" in source:
        return "reasoning_content"
    if re.search(r"""\[['"]type['"]\]\s*==\s*['"]thinking['"]""", source):
        return "chunks"
    return "thinking" if re.search(r"""\.thinking\b|\[['"]thinking['"]\]""", source) else None


def template_messages(messages: list[Message], keep: set[int], field: str | None) -> list[dict[str, Any]]:
    """The dicts handed to the template; only messages in ``keep`` carry their reasoning, in
    ``field`` or (None) in the content: as the row wrote it, else as ``<think>`` text before it.

    >>> template_messages([Message("assistant", "4", reasoning="2+2=4")], {0}, None)
    [{'role': 'assistant', 'content': '<think>\\n2+2=4\\n</think>\\n\\n4'}]
    >>> template_messages([Message("assistant", "4", reasoning="2+2=4", written="<think>2+2=4</think>4")], {0}, None)
    [{'role': 'assistant', 'content': '<think>2+2=4</think>4'}]
    """
    out = []
    for i, m in enumerate(messages):
        d = m.to_template(reasoning=False)
        if m.reasoning is not None and i in keep:
            if field is None:
                d["content"] = m.written if m.written is not None else THINK.format(m.reasoning) + m.content
            elif field == "chunks":
                d["content"] = [{"type": "thinking", "thinking": m.reasoning}, {"type": "text", "text": m.content}]
            else:
                d[field] = m.reasoning
        out.append(d)
    return out


def kept_reasoning(messages: list[Message], reasoning: str, upto: int) -> set[int]:
    """Indexes whose reasoning is shown in a view of ``messages[:upto + 1]``."""
    if reasoning not in REASONING:
        raise SftError(f"data.reasoning: {reasoning!r} is not allowed; use one of {', '.join(REASONING)}")
    if reasoning == "keep_all":
        return set(range(upto + 1))
    return {upto} if reasoning == "keep_last" else set()


_OPENERS = {"<think>": "</think>", "[THINK]": "[/THINK]", "<thinking>": "</thinking>", "<seed:think>": "</seed:think>"}


def open_reasoning(prompt: str) -> tuple[str, str, str] | None:
    """(opening tag, whitespace after it, closing tag) when a generation prompt ends inside an
    open reasoning block, else None.

    >>> open_reasoning("<｜Assistant｜><think>\\n")
    ('<think>', '\\n', '</think>')
    >>> open_reasoning("<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n") is None
    True
    """
    body = prompt.rstrip(" \t\n")
    for tag, close in _OPENERS.items():
        if body.endswith(tag):
            return tag, prompt[len(body):], close
    return None


def closes_empty_block(prompt: str) -> bool:
    """Whether a generation prompt ends with an empty, closed reasoning block (Qwen3 and SmolLM3
    with ``enable_thinking: false``, DeepSeek-V3.1 without ``thinking``): no reasoning is asked for.

    >>> closes_empty_block("<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n"), closes_empty_block("<think>\\n")
    (True, False)
    """
    return any(re.search(re.escape(o) + r"\s*" + re.escape(c) + r"\s*$", prompt) for o, c in _OPENERS.items())


def renders_block(turn: str, reasoning: str | None, close: str) -> bool:
    """Whether a rendered turn already holds the reasoning block's end (and the reasoning)."""
    if reasoning is not None and reasoning.strip():
        return reasoning.strip() in turn and close in turn
    return close in turn


def thought_after_open(m: Message, reasoning: str | None, opened: tuple[str, str, str]) -> str:
    """What the model writes after a prompt that opened a reasoning block, before the answer: the
    reasoning and closing tag as the row wrote them (less the opening the prompt already has), else
    ``reasoning + ws + close + ws * 2`` in the whitespace of the prompt's opening.

    >>> thought_after_open(Message("assistant", "Yes."), "17 is odd", ("<think>", "\\n", "</think>"))
    '17 is odd\\n</think>\\n\\n'
    >>> thought_after_open(Message("assistant", "Yes."), None, ("<think>", "", "</think>"))
    '</think>'
    >>> m = Message("assistant", "Yes.", reasoning="17 is odd", written="<think>17 is odd</think>\\n\\nYes.")
    >>> thought_after_open(m, "17 is odd", ("<think>", "\\n", "</think>"))
    '17 is odd</think>\\n\\n'
    """
    tag, ws, close = opened
    w = m.written.lstrip() if reasoning is not None and m.written is not None else ""
    if w.startswith(tag) and close in w:
        body, _, after = w[len(tag):].partition(close)
        body = body[len(ws):] if ws and body.startswith(ws) else body
        return body + close + after[: len(after) - len(after.lstrip("\n"))]  # the answer keeps the rest
    return (reasoning or "") + ws + close + ws * 2
