"""``eval.metric: tool_call``: is the right function called with the right arguments?

Function-calling fine-tunes are judged by the call, not the text (the Berkeley Function Calling
Leaderboard's AST match): a row is correct when the reply's calls have the reference's function
names and arguments equal as JSON values (key order free, 1 equals 1.0), and a reply to a row whose
reference turn has no call must not call anything.

- The reference turn of a row is its last assistant turn with tool calls (its last assistant turn
  when it has none: then no call is expected); the model answers the messages before it.
- The reply is parsed with the call format of the chat template used in training, read off the
  template itself by rendering a probe call (``call_format``): Hermes/Qwen/ChatML write
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, Llama 3.1 a bare
  ``{"name": ..., "parameters": ...}``.
- Per row: ``call_ok`` (names and arguments), ``name_ok`` (names only), ``unparseable`` (the reply
  opens a call that is not valid JSON with a name, e.g. cut off by ``eval.max_new_tokens``).
  ``tool_call_rates`` gives the shares over the rows scored with this metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sft.data.types import Conversation, Message
from sft.errors import SftError

Call = tuple[str, Any]  # (function name, arguments as a JSON value)
PROBE = "sft_probe_function"


@dataclass(frozen=True)
class CallFormat:
    open: str  # text before each call's JSON object ("<tool_call>"; "" when the reply is the JSON)
    close: str  # text after it ("</tool_call>"; "")
    args_key: str  # "arguments" (Hermes) or "parameters" (Llama 3.1)


@dataclass(frozen=True)
class CallScore:
    call_ok: bool
    name_ok: bool
    unparseable: bool


HERMES = CallFormat("<tool_call>", "</tool_call>", "arguments")
LLAMA3_JSON = CallFormat("", "", "parameters")


def call_format(tokenizer: Any, template: str) -> CallFormat:
    """The call format ``template`` (Jinja source, or a name ``resolve_template`` takes) writes: a
    probe call is rendered and the text around its JSON object, up to the end-of-turn marker, is
    the format."""
    from sft.data.chat import end_of_turn_tokens, resolve_template
    from sft.data.masks import render

    if "{{" not in template and "{%" not in template:
        template = resolve_template(template, tokenizer)

    user = {"role": "user", "content": "Call the probe."}
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": PROBE, "arguments": {"q": 1}}}]}
    tools = [{"type": "function", "function": {"name": PROBE, "description": "a probe",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}}}}]
    where = "eval.metric tool_call (a probe call rendered with the chat template)"
    prompt = render(tokenizer, template, [user], tools, True, where)
    full = render(tokenizer, template, [user, call], tools, False, where)
    fix = "use a template that writes tool calls (data.template: chatml or llama3)"
    if not full.startswith(prompt) or PROBE not in full[len(prompt):]:
        raise SftError(f"{where}: the template does not write the call after its generation prompt; {fix}")
    turn = full[len(prompt):]
    found = _object_with_name(turn, turn.index(PROBE))
    if found is None:
        raise SftError(f"{where}: the template writes the call, but not as a JSON object with its name; {fix}")
    start, end, obj = found
    args = [k for k, v in obj.items() if k != "name" and v == {"q": 1}]
    if not args:
        raise SftError(f"{where}: the template's call object has no arguments field; {fix}")
    marker, _ = end_of_turn_tokens(tokenizer, template)
    tail = turn[end:]
    if marker and marker in tail:
        tail = tail[: tail.index(marker)]
    return CallFormat(turn[:start].strip(), tail.strip(), args[0])


def _object_with_name(text: str, at: int) -> tuple[int, int, dict[str, Any]] | None:
    """(start, end, value) of the JSON object in ``text`` that encloses position ``at`` and has a
    "name" key; the innermost such object."""
    decoder = json.JSONDecoder()
    for start in range(at, -1, -1):
        if text[start] != "{":
            continue
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "name" in value and end > at:
            return start, end, value
    return None


def _call(value: Any, fmt: CallFormat) -> Call | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(fmt.args_key, value.get("arguments", value.get("parameters", {})))
    if isinstance(args, str):  # OpenAI style: the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return value["name"], args


def parse_calls(reply: str, fmt: CallFormat) -> list[Call] | None:
    """The calls written in ``reply`` ([] for none); None when a call is opened but cannot be read.

    >>> parse_calls('Sure.\\n<tool_call>\\n{"name": "f", "arguments": {"a": 1}}\\n</tool_call>', HERMES)
    [('f', {'a': 1})]
    >>> parse_calls("It is sunny.", HERMES), parse_calls('<tool_call>\\n{"name": "f", "argu', HERMES)
    ([], None)
    >>> parse_calls('{"name": "f", "parameters": {"a": 1}}', LLAMA3_JSON), parse_calls("Hello", LLAMA3_JSON)
    ([('f', {'a': 1})], [])
    """
    calls: list[Call] = []
    if fmt.open:
        pieces = reply.split(fmt.open)[1:]
        for piece in pieces:
            if fmt.close not in piece:
                return None
            try:
                call = _call(json.loads(piece[: piece.index(fmt.close)]), fmt)
            except json.JSONDecodeError:
                return None
            if call is None:
                return None
            calls.append(call)
        return calls
    text = reply.strip()
    if not text.startswith("{"):  # a text reply: no call
        return []
    decoder, pos = json.JSONDecoder(), 0
    while pos < len(text):  # one object, or several separated by white space or ";"
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        call = _call(value, fmt)
        if call is None:
            return None
        calls.append(call)
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
    return calls


def _canonical(value: Any) -> Any:
    """JSON value equality: 1 == 1.0, key order free (True stays apart from 1)."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _key(call: Call) -> str:
    return json.dumps([call[0], _canonical(call[1])], sort_keys=True)


def score_calls(got: list[Call] | None, want: list[Call]) -> CallScore:
    """Compare parsed calls with the reference's (the order of several calls does not matter).

    >>> score_calls([("f", {"a": 1.0, "b": [2]})], [("f", {"b": [2], "a": 1})])
    CallScore(call_ok=True, name_ok=True, unparseable=False)
    >>> score_calls([("f", {"a": 2})], [("f", {"a": 1})]), score_calls([], [])
    (CallScore(call_ok=False, name_ok=True, unparseable=False), CallScore(call_ok=True, name_ok=True, unparseable=False))
    """
    if got is None:
        return CallScore(False, False, True)
    names_ok = sorted(c[0] for c in got) == sorted(c[0] for c in want)
    return CallScore(sorted(map(_key, got)) == sorted(map(_key, want)), names_ok, False)


def expected_calls(reference: str) -> list[Call]:
    """The calls of a reference written by ``call_reference`` (a JSON list of {name, arguments})."""
    return [(c["name"], c["arguments"]) for c in json.loads(reference)]


def call_reference(conv: Conversation) -> tuple[list[Message], str] | None:
    """The messages before the row's reference turn and that turn's calls as a JSON list of
    ``{"name", "arguments"}`` (``[]``: no call expected). None without a turn to score.

    >>> c = Conversation([Message("user", "hi"), Message("assistant", "", tool_calls=[
    ...     {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]),
    ...     Message("tool", "2"), Message("assistant", "It is 2.")])
    >>> msgs, ref = call_reference(c)
    >>> [m.role for m in msgs], ref
    (['user'], '[{"name": "f", "arguments": {"a": 1}}]')
    """
    turns = [i for i, m in enumerate(conv.messages) if m.role == "assistant" and i > 0]
    with_calls = [i for i in turns if conv.messages[i].tool_calls]
    if not turns:
        return None
    i = (with_calls or turns)[-1]
    calls = []
    for c in conv.messages[i].tool_calls or []:
        fn = c.get("function", c)
        args = fn.get("arguments", {})
        calls.append({"name": fn["name"], "arguments": json.loads(args) if isinstance(args, str) else args})
    return conv.messages[:i], json.dumps(calls, ensure_ascii=False)


def tool_call_rates(scores: list[CallScore]) -> dict[str, float | None]:
    """``tool_call_accuracy``, ``tool_name_accuracy`` and ``tool_call_unparseable`` (shares of the
    rows scored with ``tool_call``; None without such rows).

    >>> tool_call_rates([CallScore(True, True, False), CallScore(False, False, True)])
    {'tool_call_accuracy': 0.5, 'tool_name_accuracy': 0.5, 'tool_call_unparseable': 0.5}
    """
    n = len(scores)
    return {
        "tool_call_accuracy": sum(s.call_ok for s in scores) / n if n else None,
        "tool_name_accuracy": sum(s.name_ok for s in scores) / n if n else None,
        "tool_call_unparseable": sum(s.unparseable for s in scores) / n if n else None,
    }
