"""Rows -> ``Conversation``: the five input formats, detected from a row's keys or forced.

Every function here is pure: a row (a decoded JSON object, a CSV/Parquet row as a dict) goes in,
a ``Conversation`` and a list of problems come out. Problems read ``where: what is wrong; how to
fix`` without the ``FILE:LINE:`` prefix, which the reader of the file adds.

Formats:
- ``messages``: ``{"messages": [{"role", "content", "train"?, "tool_calls"?, "name"?, "tool_call_id"?,
  "reasoning_content"? (or "thinking")}], "tools"?}`` (OpenAI/Qwen conventions)
- ``sharegpt``: ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``; glaive-style
  ``function_call`` turns (a JSON call) become assistant ``tool_calls``, ``observation`` turns tool
  messages answering them

Reasoning written as ``<think>...</think>`` at the start of an assistant's content is moved to
``Message.reasoning``; tool calls are normalised to ``{"type": "function", "id"?, "function":
{"name", "arguments": {...}}}`` and tool schemas to ``{"type": "function", "function": {...}}``.
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}``
- ``prompt_completion``: ``{"prompt", "completion"}``, each a string or a list of messages
- ``text``: ``{"text"}``, a plain document trained on every token
"""

from __future__ import annotations

import json
from typing import Any

from sft.data.types import Conversation, Message

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
CATEGORIES = ("harmful", "benign")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
_SHAREGPT_NAMES = "human, gpt, system, function_call, observation"
KEYS_HINT = (
    "expected the keys of one format: messages, conversations (sharegpt), instruction+output (alpaca), "
    "prompt+completion, or text; or set format: in the config"
)


def detect_format(row: Any) -> str | None:
    """The format a row's keys indicate, or None when they fit none.

    >>> detect_format({"messages": []})
    'messages'
    >>> detect_format({"instruction": "Add 2+2", "input": "", "output": "4"})
    'alpaca'
    >>> detect_format({"question": "?"}) is None
    True
    """
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _maybe_json(value: Any) -> Any:
    """CSV and Parquet cells (and glaive's ``tools``) hold lists as JSON strings."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text(value: Any, where: str, problems: list[str]) -> str | None:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    problems.append(f"{where} is {_type(value)}; write the text as a string")
    return None


def _tools(row: dict[str, Any], problems: list[str]) -> list[dict[str, Any]] | None:
    tools = _maybe_json(row.get("tools"))
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        problems.append(f"tools is {_type(tools)}; write a list of JSON tool schemas (or a JSON string of one)")
        return None
    # glaive and others list bare {name, description, parameters}: wrap them as OpenAI does
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _calls(value: Any, where: str, problems: list[str]) -> list[dict[str, Any]] | None:
    """OpenAI tool calls (or bare ``{name, arguments}`` objects) -> the normal form; arguments
    given as a JSON string are decoded so every template sees an object.

    >>> _calls([{"name": "add", "arguments": '{"a": 1}'}], "m", [])
    [{'type': 'function', 'function': {'name': 'add', 'arguments': {'a': 1}}}]
    """
    value = _maybe_json(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, dict) for c in value):
        problems.append(f"{where} is {_type(value)}; write a list of call objects")
        return None
    out = []
    for k, call in enumerate(value):
        fn = call.get("function", call)
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            problems.append(f"{where}[{k}] has no function name; write {{\"name\": ..., \"arguments\": {{...}}}}")
            return None
        args = _maybe_json(fn.get("arguments", fn.get("parameters", {})))
        norm: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            norm["id"] = call["id"]
        out.append(norm)
    return out


def split_reasoning(content: str) -> tuple[str | None, str]:
    """``<think>r</think>answer`` -> (``r``, ``answer``), newlines around both trimmed as Qwen3's
    template trims them; content without ``</think>`` is returned unchanged.

    >>> split_reasoning("<think>\\n2+2=4\\n</think>\\n\\nIt is 4.")
    ('2+2=4', 'It is 4.')
    >>> split_reasoning("It is 4.")
    (None, 'It is 4.')
    """
    head, sep, tail = content.partition("</think>")
    if not sep or ("<think>" in head and not head.lstrip().startswith("<think>")):
        return None, content
    return head.lstrip().removeprefix("<think>").strip("\n"), tail.lstrip("\n")


def _message(m: Any, where: str, problems: list[str]) -> Message | None:
    if not isinstance(m, dict):
        problems.append(f"{where} is {_type(m)}; write an object with role and content")
        return None
    role = m.get("role")
    if role not in ROLES:
        what = "missing" if role is None else repr(role)
        problems.append(f"{where}.role is {what}; use one of {', '.join(ROLES)}")
        return None
    tool_calls = None
    if m.get("tool_calls") not in (None, []):
        tool_calls = _calls(m.get("tool_calls"), f"{where}.tool_calls", problems)
        if tool_calls is None:
            return None
    content: Any = m.get("content")
    if content is None and tool_calls:
        content = ""
    text = _text(content, f"{where}.content", problems)
    if text is None:
        return None
    train = m.get("train")
    if train is not None and not isinstance(train, bool):
        problems.append(f"{where}.train is {train!r}; use true or false")
        return None
    reasoning = m.get("reasoning_content", m.get("thinking"))
    if reasoning is not None and not isinstance(reasoning, str):
        problems.append(f"{where}.reasoning_content is {_type(reasoning)}; write the reasoning as a string")
        return None
    written = None
    if role == "assistant" and reasoning is None:
        reasoning, answer = split_reasoning(text)
        written, text = (text, answer) if reasoning is not None else (None, text)
    name, call_id = m.get("name"), m.get("tool_call_id")
    return Message(
        role, text, train=train, tool_calls=tool_calls, name=name if isinstance(name, str) else None,
        tool_call_id=call_id if isinstance(call_id, str) else None,
        reasoning=reasoning if role == "assistant" else None, written=written,
    )


def _messages(value: Any, where: str, problems: list[str]) -> list[Message]:
    value = _maybe_json(value)
    if not isinstance(value, list):
        problems.append(f"{where} is {_type(value)}; write a list of {{role, content}} objects")
        return []
    out = []
    for i, m in enumerate(value):
        msg = _message(m, f"{where}[{i}]", problems)
        if msg is not None:
            out.append(msg)
    return out


def _from_messages(row: dict[str, Any], problems: list[str]) -> Conversation:
    return Conversation(_messages(row.get("messages"), "messages", problems), tools=_tools(row, problems))


def _from_sharegpt(row: dict[str, Any], problems: list[str]) -> Conversation:
    turns = _maybe_json(row.get("conversations"))
    msgs: list[Message] = []
    if not isinstance(turns, list):
        problems.append(f"conversations is {_type(turns)}; write a list of {{from, value}} objects")
        turns = []
    system = row.get("system")
    if system not in (None, ""):
        text = _text(system, "system", problems)
        if text is not None:
            msgs.append(Message("system", text))
    pending: list[dict[str, Any]] = []  # calls of function_call turns not yet answered
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            problems.append(f"{where} is {_type(t)}; write an object with from and value")
            continue
        frm = t.get("from")
        role = SHAREGPT_ROLES.get(frm) if isinstance(frm, str) else None
        if role is None:
            what = "missing" if frm is None else repr(frm)
            problems.append(f"{where}.from is {what}; use one of {_SHAREGPT_NAMES}")
            continue
        if frm == "function_call":  # glaive: the value is the JSON call
            calls = _calls(t.get("value"), f"{where}.value", problems)
            if calls is not None:
                made = sum(len(m.tool_calls or []) for m in msgs)
                for k, call in enumerate(calls):
                    call.setdefault("id", f"call{made + k + 1:05d}")  # 9 alphanumerics, as Mistral wants
                    pending.append(call)
                msgs.append(Message("assistant", "", tool_calls=calls))
            continue
        text = _text(t.get("value"), f"{where}.value", problems)
        if text is None:
            continue
        if role == "tool" and pending:  # an observation answers the oldest unanswered call
            call = pending.pop(0)
            msgs.append(Message("tool", text, name=call["function"]["name"], tool_call_id=call["id"]))
            continue
        msg = Message(role, text)  # type: ignore[arg-type]
        if role == "assistant":
            msg.reasoning, msg.content = split_reasoning(text)
            msg.written = text if msg.reasoning is not None else None
        msgs.append(msg)
    return Conversation(msgs, tools=_tools(row, problems))


def _from_alpaca(row: dict[str, Any], problems: list[str]) -> Conversation:
    msgs: list[Message] = []
    system = row.get("system")
    if system not in (None, ""):
        text = _text(system, "system", problems)
        if text is not None:
            msgs.append(Message("system", text))
    history = _maybe_json(row.get("history"))
    if history not in (None, ""):
        ok = isinstance(history, list) and all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history
        )
        if not ok:
            problems.append("history is not a list of [user, assistant] string pairs; fix or remove it")
        else:
            for user, assistant in history:
                msgs += [Message("user", user), Message("assistant", assistant)]
    instruction = row.get("instruction")
    extra = row.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        what = "empty" if isinstance(instruction, str) else f"{_type(instruction)}"
        problems.append(f"instruction is {what}; write the task as a non-empty string")
        instruction = ""
    if extra is not None and not isinstance(extra, str):
        problems.append(f"input is {_type(extra)}; write it as a string (or leave it empty)")
        extra = None
    prompt = f"{instruction}\n{extra}" if extra else instruction
    msgs.append(Message("user", prompt))
    output = row.get("output")
    if isinstance(output, str):
        msgs.append(Message("assistant", output))
    else:
        problems.append(f"output is {_type(output)}; write the answer as a string")
    return Conversation(msgs)


def _from_prompt_completion(row: dict[str, Any], problems: list[str]) -> Conversation:
    msgs: list[Message] = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(key)
        if isinstance(value, str):
            msgs.append(Message(role, value))  # type: ignore[arg-type]
        else:
            msgs += _messages(value, key, problems)
    return Conversation(msgs, tools=_tools(row, problems))


def _from_text(row: dict[str, Any], problems: list[str]) -> Conversation:
    text = row.get("text")
    if not isinstance(text, str):
        problems.append(f"text is {_type(text)}; write the document as a string")
    elif not text.strip():
        problems.append("text is empty; remove the row or write the document")
    return Conversation([Message("assistant", text if isinstance(text, str) else "")], is_text=True)


REQUIRED = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}

_PARSERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}


def check_conversation(conv: Conversation) -> list[str]:
    """Problems that make a conversation untrainable, whatever its format.

    >>> check_conversation(Conversation([Message("user", "hi")]))
    ['no assistant turn; add at least one assistant message to train on']
    """
    if conv.is_text:
        return []
    problems = []
    if not any(m.role == "assistant" for m in conv.messages):
        return ["no assistant turn; add at least one assistant message to train on"]
    for i, m in enumerate(conv.messages):
        if m.role == "assistant" and not m.content.strip() and not m.tool_calls:
            problems.append(f"messages[{i}].content is empty; write the assistant's answer or remove the turn")
    return problems


def parse_row(row: Any, fmt: str, system: str | None = None) -> tuple[Conversation | None, list[str]]:
    """Normalise one row of format ``fmt``; returns the conversation, or None and every problem.

    ``system`` is added as a system prompt to conversations that have none (``data.system``).

    >>> conv, problems = parse_row({"instruction": "Add", "input": "2+2", "output": "4"}, "alpaca")
    >>> [(m.role, m.content) for m in conv.messages], problems
    ([('user', 'Add\\n2+2'), ('assistant', '4')], [])
    >>> parse_row({"messages": [{"role": "bot", "content": "hi"}]}, "messages")[1]
    ["messages[0].role is 'bot'; use one of system, user, assistant, tool"]
    """
    if not isinstance(row, dict):
        return None, [f"row is {_type(row)}; each row must be a JSON object"]
    if fmt not in _PARSERS:
        return None, [f"format {fmt!r} is unknown; use one of {', '.join(FORMATS)}"]
    missing = [k for k in REQUIRED[fmt] if k not in row]
    if missing:
        return None, [
            f"{' and '.join(missing)} missing (the row has keys {sorted(row)}) for format {fmt}; "
            "add the key, or set format: for this source if its rows differ from the first row"
        ]
    problems: list[str] = []
    conv = _PARSERS[fmt](row, problems)
    if problems:
        return None, problems
    problems = check_conversation(conv)
    category = row.get("category")  # safety evaluation: refusal_rate (harmful), over_refusal_rate (benign)
    if category is not None and category not in CATEGORIES:
        problems.append(f"category is {category!r}; use \"harmful\" or \"benign\" (or leave the key out)")
    constraints = row.get("constraints")  # eval: checked in full by sft.evaluation.constraints
    if constraints is not None and not (isinstance(constraints, list) and all(
            isinstance(c, dict) and isinstance(c.get("type"), str) for c in constraints)):
        problems.append("constraints is not a list of objects with a \"type\"; write e.g. "
                        "[{\"type\": \"max_words\", \"n\": 30}] (or leave the key out)")
    if problems:
        return None, problems
    conv.category = category
    conv.constraints = constraints
    if system and not conv.is_text and not any(m.role == "system" for m in conv.messages):
        conv.messages.insert(0, Message("system", system))
    return conv, []


def parse_prompt(row: Any) -> tuple[Conversation | None, list[str]]:
    """A row to answer (``sft generate --prompts``), in any training format without its reply:
    ``messages`` or ShareGPT ``conversations`` (answered after their last message), Alpaca without
    ``output``, ``prompt`` without ``completion``; problems as ``parse_row`` words them.

    >>> [(m.role, m.content) for m in parse_prompt({"instruction": "Add", "input": "2+2"})[0].messages]
    [('user', 'Add\\n2+2')]
    >>> [(m.role, m.content) for m in parse_prompt({"prompt": "Hi"})[0].messages]
    [('user', 'Hi')]
    >>> print(parse_prompt({"question": "?"})[1][0])
    row keys are ['question']; write {"messages": [...]}, {"prompt": ...}, {"instruction": ...} or {"conversations": [...]}
    """
    if not isinstance(row, dict):
        return None, [f"row is {_type(row)}; each row must be a JSON object"]
    reply = None  # the reply key a format needs: given empty here, its message dropped after parsing
    if "messages" in row:
        fmt = "messages"
    elif "conversations" in row:
        fmt = "sharegpt"
    elif "instruction" in row:
        fmt, reply = "alpaca", "output"
    elif "prompt" in row:
        fmt, reply = "prompt_completion", "completion"
    else:
        return None, [f"row keys are {sorted(row)}; write {{\"messages\": [...]}}, {{\"prompt\": ...}}, "
                      "{\"instruction\": ...} or {\"conversations\": [...]}"]
    problems: list[str] = []
    conv = _PARSERS[fmt]({**row, reply: ""} if reply else row, problems)
    if reply:
        conv.messages.pop()
    if not problems and not conv.messages:
        problems.append(f"{fmt} is empty; write at least one message to answer")
    return (None, problems) if problems else (conv, [])


def conversation_key(conv: Conversation) -> str:
    """A canonical string of what a conversation says, for finding exact duplicates.

    >>> a = Conversation([Message("user", "hi"), Message("assistant", "yo")], source="a.jsonl", line=1)
    >>> b = Conversation([Message("user", "hi"), Message("assistant", "yo")], source="b.jsonl", line=9)
    >>> conversation_key(a) == conversation_key(b)
    True
    """
    body = {
        "m": [[m.role, m.content, m.train, m.tool_calls, m.name, m.tool_call_id, m.reasoning, m.written] for m in conv.messages],
        "t": conv.tools,
        "x": conv.is_text,
    }
    return json.dumps(body, sort_keys=True, ensure_ascii=False)
