"""Verifiable format constraints (IFEval-style): checks a program can make on a reply, no judge.

An eval row may carry ``"constraints": [{"type": "max_words", "n": 30}, ...]``. ``sft eval``
checks every reply against its row's list and reports ``constraint_rows_met`` (share of such rows
with all their constraints met) and ``constraint_share_met`` (share of all the constraints met);
with ``eval.metric: constraints`` (or a source's ``metric: constraints``) a row is "correct" when
all of its constraints are met.

Each checker is a small pure function ``(reply, spec) -> bool``; ``CHECKS`` names them and the
arguments they take. Words are runs of letters, digits, apostrophes and hyphens; a bullet is a line
starting with ``-``, ``*`` or ``•`` and a space; paragraphs are separated by blank lines. Text
comparisons (``must_include``, ``starts_with`` ...) ignore case and surrounding whitespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from sft.errors import SftError

Spec = dict[str, Any]

_WORD = re.compile(r"[\w'’-]+")
_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)


def words(text: str) -> int:
    """Number of words.

    >>> words("Tea's origin: south-west China, 2000 years ago.")
    7
    """
    return len(_WORD.findall(text))


def _texts(spec: Spec) -> list[str]:
    t = spec["text"]
    return [t] if isinstance(t, str) else list(t)


def json_object(text: str) -> dict[str, Any] | None:
    """The reply as a JSON object (a fenced ```json block counts), else None (the `json` metric and
    the `json_keys` constraint share it)."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fence:  # a fenced block is still "the reply is a JSON object"
        body = fence.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def max_words(reply: str, spec: Spec) -> bool:
    """At most ``n`` words.

    >>> max_words("one two three", {"n": 3}), max_words("one two three four", {"n": 3})
    (True, False)
    """
    return words(reply) <= spec["n"]


def min_words(reply: str, spec: Spec) -> bool:
    """At least ``n`` words.

    >>> min_words("one two three", {"n": 3}), min_words("one two", {"n": 3})
    (True, False)
    """
    return words(reply) >= spec["n"]


def max_chars(reply: str, spec: Spec) -> bool:
    """At most ``n`` characters (surrounding whitespace not counted).

    >>> max_chars(" abc ", {"n": 3}), max_chars("abcd", {"n": 3})
    (True, False)
    """
    return len(reply.strip()) <= spec["n"]


def num_bullets(reply: str, spec: Spec) -> bool:
    """Exactly ``n`` bullet lines.

    >>> num_bullets("Facts:\\n- one\\n* two\\n• three", {"n": 3}), num_bullets("- one\\n-two", {"n": 2})
    (True, False)
    """
    return len(_BULLET.findall(reply)) == spec["n"]


def num_paragraphs(reply: str, spec: Spec) -> bool:
    """Exactly ``n`` non-empty blocks separated by blank lines.

    >>> num_paragraphs("One.\\n\\nTwo.\\n  \\nThree.", {"n": 3}), num_paragraphs("One.\\nStill one.", {"n": 2})
    (True, False)
    """
    return len([p for p in re.split(r"\n\s*\n", reply.strip()) if p.strip()]) == spec["n"]


def json_keys(reply: str, spec: Spec) -> bool:
    """The reply (or a fenced block that is the whole reply) is a JSON object with at least these keys.

    >>> json_keys('{"name": "tea", "origin": "China"}', {"keys": ["name", "origin"]})
    True
    >>> json_keys('{"name": "tea"}', {"keys": ["name", "origin"]}), json_keys("name: tea", {"keys": []})
    (False, False)
    """
    obj = json_object(reply)
    return obj is not None and all(k in obj for k in spec.get("keys", []))


def must_include(reply: str, spec: Spec) -> bool:
    """Every ``text`` (a string or a list) appears, ignoring case.

    >>> must_include("Green TEA is mild.", {"text": ["tea", "green"]}), must_include("Coffee.", {"text": "tea"})
    (True, False)
    """
    low = reply.lower()
    return all(t.lower() in low for t in _texts(spec))


def must_not_include(reply: str, spec: Spec) -> bool:
    """No ``text`` appears, ignoring case.

    >>> must_not_include("Green tea.", {"text": ["coffee"]}), must_not_include("Coffee!", {"text": "coffee"})
    (True, False)
    """
    low = reply.lower()
    return not any(t.lower() in low for t in _texts(spec))


def starts_with(reply: str, spec: Spec) -> bool:
    """Starts with ``text``.

    >>> starts_with("  Yes, it is.", {"text": "yes"}), starts_with("Well, yes.", {"text": "Yes"})
    (True, False)
    """
    return reply.strip().lower().startswith(str(spec["text"]).strip().lower())


def ends_with(reply: str, spec: Spec) -> bool:
    """Ends with ``text``.

    >>> ends_with("It is. Hope this helps.\\n", {"text": "hope this helps."}), ends_with("Done", {"text": "."})
    (True, False)
    """
    return reply.strip().lower().endswith(str(spec["text"]).strip().lower())


def lowercase(reply: str, spec: Spec) -> bool:
    """Letters only in lower case (and at least one letter).

    >>> lowercase("green tea, 2 cups.", {}), lowercase("Green tea.", {}), lowercase("42", {})
    (True, False, False)
    """
    return any(c.isalpha() for c in reply) and not any(c.isupper() for c in reply)


def uppercase(reply: str, spec: Spec) -> bool:
    """Letters only in upper case (and at least one letter).

    >>> uppercase("GREEN TEA, 2 CUPS.", {}), uppercase("GREEN Tea.", {})
    (True, False)
    """
    return any(c.isalpha() for c in reply) and not any(c.islower() for c in reply)


def no_commas(reply: str, spec: Spec) -> bool:
    """No comma anywhere.

    >>> no_commas("Tea is mild.", {}), no_commas("Tea, mild.", {})
    (True, False)
    """
    return "," not in reply


def one_line(reply: str, spec: Spec) -> bool:
    """A single line.

    >>> one_line("  One line.\\n", {}), one_line("One.\\nTwo.", {})
    (True, False)
    """
    return "\n" not in reply.strip()


# type -> (checker, {argument: type the argument must have})
CHECKS: dict[str, tuple[Callable[[str, Spec], bool], dict[str, Any]]] = {
    "max_words": (max_words, {"n": int}),
    "min_words": (min_words, {"n": int}),
    "max_chars": (max_chars, {"n": int}),
    "num_bullets": (num_bullets, {"n": int}),
    "num_paragraphs": (num_paragraphs, {"n": int}),
    "json_keys": (json_keys, {"keys": list}),
    "must_include": (must_include, {"text": (str, list)}),
    "must_not_include": (must_not_include, {"text": (str, list)}),
    "starts_with": (starts_with, {"text": str}),
    "ends_with": (ends_with, {"text": str}),
    "lowercase": (lowercase, {}),
    "uppercase": (uppercase, {}),
    "no_commas": (no_commas, {}),
    "one_line": (one_line, {}),
}


def spec_problem(spec: Any) -> str | None:
    """What is wrong with one constraint, or None.

    >>> spec_problem({"type": "max_words", "n": 30}) is None
    True
    >>> spec_problem({"type": "max_word", "n": 30})
    "type 'max_word' is unknown; did you mean 'max_words'? (known: max_words, min_words, max_chars, num_bullets, num_paragraphs, json_keys, must_include, must_not_include, starts_with, ends_with, lowercase, uppercase, no_commas, one_line)"
    >>> spec_problem({"type": "max_words", "n": "30"})
    "max_words needs n (a whole number), e.g. {'type': 'max_words', 'n': 30}"
    """
    import difflib

    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        return f"{spec!r} is not a constraint; write an object such as {{\"type\": \"max_words\", \"n\": 30}}"
    kind = spec["type"]
    if kind not in CHECKS:
        close = difflib.get_close_matches(kind, list(CHECKS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"type {kind!r} is unknown; {hint}(known: {', '.join(CHECKS)})"
    for arg, typ in CHECKS[kind][1].items():
        value = spec.get(arg)
        ok = isinstance(value, typ) and not isinstance(value, bool)
        if isinstance(value, int) and value < 0:
            ok = False
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            ok = False
        if not ok:
            example = {"n": 30, "keys": ["name", "origin"], "text": "tea"}[arg]
            what = {"n": "a whole number", "keys": "a list of strings", "text": "a string or a list of strings"}[arg]
            return f"{kind} needs {arg} ({what}), e.g. {{'type': {kind!r}, {arg!r}: {example!r}}}"
    unknown = sorted(set(spec) - {"type", *CHECKS[kind][1]})
    if unknown:
        return f"{kind} takes no {', '.join(unknown)}; remove it (arguments: {', '.join(CHECKS[kind][1]) or 'none'})"
    return None


def check_rows(specs: list[tuple[str, Any]]) -> None:
    """Raise one SftError listing every bad ``constraints`` list: (``file:line``, the row's list)."""
    problems = []
    for where, listed in specs:
        if not isinstance(listed, list) or not listed:
            problems.append(f"{where}: constraints is {listed!r}; give a non-empty list of constraints")
            continue
        for i, spec in enumerate(listed):
            why = spec_problem(spec)
            if why:
                problems.append(f"{where}: constraints[{i}]: {why}")
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SftError("eval: bad constraints:\n  " + "\n  ".join(problems[:20]) + more)


def check(reply: str, constraints: list[Spec]) -> list[bool]:
    """Which of ``constraints`` the reply meets, in order.

    >>> check("- green\\n- black", [{"type": "num_bullets", "n": 2}, {"type": "must_include", "text": "oolong"}])
    [True, False]
    """
    return [CHECKS[c["type"]][0](reply, c) for c in constraints]
