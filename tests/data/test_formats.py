from __future__ import annotations

import json

import pytest

from sft.data.formats import conversation_key, detect_format, parse_row
from sft.data.types import Message


def roles(conv):
    return [(m.role, m.content) for m in conv.messages]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": [], "tools": "[]"}, "sharegpt"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"text": "doc"}, "text"),
        ({"question": "a", "answer": "b"}, None),
        (["not", "a", "dict"], None),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_messages_with_train_flag_tools_and_tool_calls():
    row = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
            {"role": "tool", "content": "sunny", "name": "w"},
            {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "sunny"}]},
            {"role": "assistant", "content": "skip me", "train": False},
        ],
        "tools": json.dumps([{"name": "w", "parameters": {}}]),
    }
    conv, problems = parse_row(row, "messages")
    assert problems == []
    assert roles(conv) == [("user", "weather?"), ("assistant", ""), ("tool", "sunny"),
                           ("assistant", "It is sunny"), ("assistant", "skip me")]
    # calls and tool schemas in OpenAI's normal form (arguments an object, schemas wrapped)
    assert conv.messages[1].tool_calls == [{"type": "function", "function": {"name": "w", "arguments": {}}}]
    assert conv.messages[2].name == "w"
    assert [m.train for m in conv.messages] == [None, None, None, None, False]
    assert conv.tools == [{"type": "function", "function": {"name": "w", "parameters": {}}}]


def test_sharegpt_glaive_style():
    row = {
        "system": "be brief",
        "conversations": [
            {"from": "human", "value": "recipe?"},
            {"from": "function_call", "value": '{"name": "search"}'},
            {"from": "observation", "value": '{"r": 1}'},
            {"from": "gpt", "value": "found one"},
        ],
        "tools": '[{"name": "search"}]',
    }
    conv, problems = parse_row(row, "sharegpt")
    assert problems == []
    # the function_call turn becomes an assistant tool call, the observation the tool's answer to it
    assert roles(conv) == [("system", "be brief"), ("user", "recipe?"), ("assistant", ""),
                           ("tool", '{"r": 1}'), ("assistant", "found one")]
    call = {"type": "function", "function": {"name": "search", "arguments": {}}, "id": "call00001"}
    assert conv.messages[2].tool_calls == [call]
    assert (conv.messages[3].name, conv.messages[3].tool_call_id) == ("search", "call00001")
    assert conv.tools == [{"type": "function", "function": {"name": "search"}}]


def test_reasoning_fields_and_think_text():
    row = {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nIt is 4."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Three plus three."},
        {"role": "user", "content": "4+4?"},
        {"role": "assistant", "content": "8", "thinking": "Four plus four."},
        {"role": "user", "content": "Say </think>"},
        {"role": "assistant", "content": "Text with <think> inside </think> is not reasoning."},
    ]}
    conv, problems = parse_row(row, "messages")
    assert problems == []
    got = [(m.reasoning, m.content) for m in conv.messages if m.role == "assistant"]
    assert got == [("Two plus two.", "It is 4."), ("Three plus three.", "6"), ("Four plus four.", "8"),
                   (None, "Text with <think> inside </think> is not reasoning.")]
    assert parse_row({"messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a", "reasoning_content": 3}]}, "messages")[1] == [
        "messages[1].reasoning_content is int; write the reasoning as a string"]


def test_alpaca_input_history_system():
    row = {"system": "S", "instruction": "Translate", "input": "chat", "output": "cat",
           "history": [["hi", "hello"]]}
    conv, problems = parse_row(row, "alpaca")
    assert problems == []
    assert roles(conv) == [("system", "S"), ("user", "hi"), ("assistant", "hello"),
                           ("user", "Translate\nchat"), ("assistant", "cat")]
    # empty input: no trailing newline
    conv, _ = parse_row({"instruction": "hi", "input": "", "output": "yo"}, "alpaca")
    assert roles(conv) == [("user", "hi"), ("assistant", "yo")]


def test_prompt_completion_strings_and_lists():
    conv, _ = parse_row({"prompt": "2+2=", "completion": "4"}, "prompt_completion")
    assert roles(conv) == [("user", "2+2="), ("assistant", "4")]
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}],
           "completion": [{"role": "assistant", "content": "a"}]}
    conv, _ = parse_row(row, "prompt_completion")
    assert roles(conv) == [("system", "S"), ("user", "q"), ("assistant", "a")]


def test_text_is_text_and_gets_no_system():
    conv, problems = parse_row({"text": "a document"}, "text", system="S")
    assert problems == [] and conv.is_text and roles(conv) == [("assistant", "a document")]


def test_system_added_only_when_missing():
    conv, _ = parse_row({"instruction": "q", "output": "a"}, "alpaca", system="S")
    assert roles(conv)[0] == ("system", "S")
    conv, _ = parse_row({"instruction": "q", "output": "a", "system": "mine"}, "alpaca", system="S")
    assert roles(conv)[0] == ("system", "mine")


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"},
                       {"role": "assistant", "content": "c"}]}, "messages",
         ["messages[1].role is 'bot'; use one of system, user, assistant, tool"]),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages",
         ["no assistant turn; add at least one assistant message to train on"]),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "messages",
         ["messages[1].content is empty; write the assistant's answer or remove the turn"]),
        ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x", "train": "no"}]},
         "messages",
         ["messages[0].content is int; write the text as a string", "messages[1].train is 'no'; use true or false"]),
        ({"messages": "hello"}, "messages", ["messages is str; write a list of {role, content} objects"]),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt",
         ["conversations[0].from is 'bot'; use one of human, gpt, system, function_call, observation"]),
        ({"instruction": "", "output": 3}, "alpaca",
         ["instruction is empty; write the task as a non-empty string", "output is int; write the answer as a string"]),
        ({"text": ""}, "text", ["text is empty; remove the row or write the document"]),
        ([1, 2], "messages", ["row is list; each row must be a JSON object"]),
        ({"instruction": "x"}, "messages", ["messages missing (the row has keys ['instruction']) for format "
                                            "messages; add the key, or set format: for this source if its rows "
                                            "differ from the first row"]),
    ],
)
def test_problems_are_all_collected_with_where_what_fix(row, fmt, expected):
    conv, problems = parse_row(row, fmt)
    assert conv is None
    assert problems == expected


def test_conversation_key_ignores_location_but_not_content():
    a, _ = parse_row({"instruction": "q", "output": "a"}, "alpaca")
    b, _ = parse_row({"instruction": "q", "output": "a"}, "alpaca")
    c, _ = parse_row({"instruction": "q", "output": "b"}, "alpaca")  # control: differs
    b.source, b.line = "other.json", 7
    assert conversation_key(a) == conversation_key(b)
    assert conversation_key(a) != conversation_key(c)
    c.messages[-1] = Message("assistant", "a", train=False)  # the train flag is part of identity
    assert conversation_key(a) != conversation_key(c)
