"""Task accuracy: an eval row's reference (its last assistant turn) and how a reply is scored
against it under ``eval.metric`` (exact, contains, regex, json; constraints and tool calls are
scored by ``sft.evaluation.constraints`` and ``sft.evaluation.tool_calls``), and the checks that
stop a bad reference before minutes of generation."""

from __future__ import annotations

import re
from typing import Any

from sft.data.types import Conversation, Message
from sft.errors import SftError
from sft.evaluation.constraints import json_object

METRICS = ("exact", "contains", "regex", "json", "constraints", "tool_call")


def score(reply: str, reference: str, metric: str) -> bool:
    """Is ``reply`` correct for ``reference`` under ``metric``?

    >>> score(" 42\\n", "42", "exact"), score("It is 42.", "42", "exact")
    (True, False)
    >>> score("My name is QUILL.", "quill", "contains")
    True
    >>> score("42", r"^\\s*42\\s*$", "regex"), score("420", r"^\\s*42\\s*$", "regex")
    (True, False)
    >>> score('{"a": 1, "b": 2}', '{"a": 1}', "json"), score('{"a": 2}', '{"a": 1}', "json")
    (True, False)
    """
    if metric == "exact":
        return reply.strip() == reference.strip()
    if metric == "contains":
        return reference.strip().lower() in reply.strip().lower()
    if metric == "regex":
        try:
            return re.search(reference, reply) is not None
        except re.error as e:
            raise SftError(f"eval: reference {reference!r} is not a valid regex ({e}); fix the pattern") from None
    if metric == "constraints":
        raise SftError("eval: the constraints metric needs the row's constraints list; score it with "
                       "sft.evaluation.constraints.check")
    if metric == "tool_call":
        raise SftError("eval.metric tool_call: needs the chat template's call format; score with "
                       "sft.evaluation.tool_calls (evaluate() does)")
    if metric == "json":
        want = json_object(reference)
        if want is None:
            raise SftError(f"eval: reference {reference!r} is not a JSON object; the json metric needs one")
        got = json_object(reply)
        return got is not None and all(k in got and got[k] == v for k, v in want.items())
    raise SftError(f"eval.metric: {metric!r} is not a metric; use one of {', '.join(METRICS)}")


def split_reference(conv: Conversation) -> tuple[list[Message], str] | None:
    """The messages before the last assistant turn, and that turn's text (None without one).

    >>> c = Conversation([Message("user", "hi"), Message("assistant", "hello")])
    >>> msgs, ref = split_reference(c)
    >>> [m.role for m in msgs], ref
    (['user'], 'hello')
    """
    for i in range(len(conv.messages) - 1, 0, -1):
        if conv.messages[i].role == "assistant":
            return conv.messages[:i], conv.messages[i].content
    return None


def constraint_checks(items: list[tuple[Conversation, list[Message], str]], metric: str) -> list[bool]:
    """Per eval row: is it scored by its constraints (``eval.metric`` or its source's ``metric`` is
    ``constraints``)? Raises one error listing every row whose constraints are missing or wrong."""
    from sft.evaluation.constraints import check_rows

    scored = [(conv.metric or metric) == "constraints" for conv, _, _ in items]
    missing = [conv.location() for (conv, _, _), s in zip(items, scored) if s and not conv.constraints]
    if missing:
        raise SftError(f"eval.metric: constraints, but {len(missing)} row(s) have no constraints list "
                       f"(first: {', '.join(missing[:3])}); add \"constraints\": [{{\"type\": \"max_words\", \"n\": 30}}] "
                       "to each row, or give those rows' source another metric")
    check_rows([(conv.location(), conv.constraints) for conv, _, _ in items if conv.constraints is not None])
    return scored


def check_references(items: list[tuple[Conversation, list[Message], str]], metric: str) -> None:
    """Raise one error listing every row whose reference its metric cannot use (a regex that does
    not compile, a ``json`` reference that is no JSON object): before minutes of generation."""
    problems = []
    for conv, _, ref in items:
        how = conv.metric or metric
        if how == "regex":
            try:
                re.compile(ref)
            except re.error as e:
                problems.append(f"{conv.location()}: reference {ref[:60]!r} is not a valid regex ({e})")
        elif how == "json" and json_object(ref) is None:
            problems.append(f"{conv.location()}: reference {ref[:60]!r} is not a JSON object; the json metric needs one")
    if problems:
        shown = "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise SftError(f"eval: {len(problems)} reference(s) that their metric cannot score:\n{shown}\n"
                       "fix those rows' last assistant message, or give their source another metric")


def by_type(met: list[list[bool] | None], constraints: list[list[dict[str, Any]] | None]) -> dict[str, float]:
    """Share met per constraint type.

    >>> by_type([[True, False], None, [True]], [[{"type": "a"}, {"type": "b"}], None, [{"type": "b"}]])
    {'a': 1.0, 'b': 0.5}
    """
    seen: dict[str, list[bool]] = {}
    for m, cs in zip(met, constraints):
        for ok, c in zip(m or [], cs or []):
            seen.setdefault(c["type"], []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(seen.items())}
