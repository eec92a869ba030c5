"""eval.metric: tool_call (sft.evaluation.tool_calls): the call format read off the template,
parsing, and evaluate() on stubbed replies: right call, wrong argument, wrong name, no call,
unparseable, and a row that expects no call."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_llama
from sft.config import load_config
from sft.errors import SftError
from sft.evaluation.evaluate import evaluate, summary
from sft.evaluation.generate import Generation
from sft.evaluation.tool_calls import HERMES, LLAMA3_JSON, CallFormat, call_format, parse_calls, score_calls
from sft.reporting.report import before_after_rows

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                                           "days": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def call_row(city: str) -> dict:
    """A user asks, the assistant calls get_weather, the tool answers, the assistant says it."""
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Weather in {city} for 2 days?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city, "days": 2}}}]},
        {"role": "tool", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": f"Clear skies in {city}."}]}


CITIES = ["Oslo", "Lima", "Pune", "Kyiv", "Rome"]
ROWS = [call_row(c) for c in CITIES] + [
    {"tools": TOOLS, "messages": [{"role": "user", "content": "Tell me a joke."},
                                  {"role": "assistant", "content": "Why did the chicken cross the road?"}]}]
REPLIES = {  # the user's city -> the stubbed reply
    "Oslo": '<tool_call>\n{"name": "get_weather", "arguments": {"days": 2.0, "city": "Oslo"}}\n</tool_call>',  # right
    "Lima": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 3}}\n</tool_call>',  # wrong argument
    "Pune": '<tool_call>\n{"name": "get_time", "arguments": {"city": "Pune", "days": 2}}\n</tool_call>',  # wrong name
    "Kyiv": "It is probably sunny in Kyiv.",  # no call
    "Rome": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro',  # cut off: unparseable
    "joke": "To get to the other side.",  # no call expected, none made
}


def _cfg(tmp_path, metric: str = "tool_call"):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "ref.txt").write_text("General English text to measure forgetting on, kept short for speed. " * 8)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({
        "model": "smollm2-135m-instruct", "output_dir": str(tmp_path / "run"),
        "data": {"template": "chatml", "cache_dir": str(tmp_path / "cache")}, "train": {"precision": "fp32"},
        "eval": {"data": [{"path": "eval.jsonl"}], "metric": metric, "max_new_tokens": 4, "samples": 6,
                 "batch_size": 2, "reference": str(tmp_path / "ref.txt")},
    }))
    return load_config(cfg_file)


def test_call_format_is_read_off_the_template(smol_tok):
    assert call_format(smol_tok, "chatml") == HERMES
    assert call_format(smol_tok, "llama3") == LLAMA3_JSON
    assert call_format(smol_tok, "gemma") == CallFormat("", "", "arguments")  # sft's Gemma: bare JSON
    plain = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(SftError, match=r"does not write the call .*data\.template: chatml or llama3"):
        call_format(smol_tok, plain)  # a template that drops tool calls


@pytest.mark.parametrize(("reply", "fmt", "calls"), [
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": "{\\"x\\": 1}"}\n</tool_call>',
     HERMES, [("a", {}), ("b", {"x": 1})]),
    ("<tool_call>\nnot json\n</tool_call>", HERMES, None),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', HERMES, None),  # no name
    ('{"name": "a", "parameters": {"x": [1, 2]}}', LLAMA3_JSON, [("a", {"x": [1, 2]})]),
    ('{"name": "a", "parameters": {"x": ', LLAMA3_JSON, None),
    ("Sure, here it is.", LLAMA3_JSON, []),
])
def test_parse_calls(reply, fmt, calls):
    assert parse_calls(reply, fmt) == calls


def test_score_calls_json_values():
    assert score_calls([("f", {"a": {"b": 1, "c": [1.0, True]}})], [("f", {"a": {"c": [1, True], "b": 1.0}})]).call_ok
    assert not score_calls([("f", {"a": 1})], [("f", {"a": True})]).call_ok  # JSON true is not 1
    assert not score_calls([("f", {})], []).name_ok  # a call where none was expected
    two = [("f", {"a": 1}), ("g", {})]
    assert score_calls(two[::-1], two).call_ok and not score_calls(two[:1], two).call_ok


def test_evaluate_scores_stubbed_tool_calls(tmp_path, smol_tok, monkeypatch):
    prompts_seen: list[str] = []

    def fake_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=8, progress=False, rt=None):
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            prompts_seen.append(text)
            key = next((c for c in CITIES if f"Weather in {c}" in text), "joke")
            out.append(Generation(text=REPLIES[key], token_ids=[1, 2], stopped=True, stop_id=2))
        return out

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    m = tiny_llama(len(smol_tok), seed=0)
    r = evaluate(_cfg(tmp_path), m, smol_tok, "chatml", progress=False)
    assert r["n_examples"] == 6
    assert r["tool_call_accuracy"] == pytest.approx(2 / 6)  # Oslo (2.0 == 2, keys reordered) and the joke
    assert r["tool_name_accuracy"] == pytest.approx(3 / 6)  # + Lima (right function, wrong days)
    assert r["tool_call_unparseable"] == pytest.approx(1 / 6)  # Rome
    assert r["task_accuracy"] == r["tool_call_accuracy"]
    assert [s["correct"] for s in r["samples"]] == [True, False, False, False, False, True]
    assert r["samples"][0]["reference"] == '[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]'
    assert r["samples"][5]["reference"] == "[]"
    # the model is asked before the call: the prompt has the tools, not the call or its result
    oslo = next(p for p in prompts_seen if "Weather in Oslo" in p)
    assert "<tools>" in oslo and "<tool_call>" not in oslo.split("<|im_start|>user")[-1] and "clear" not in oslo
    assert oslo.endswith("<|im_start|>assistant\n")
    assert ("tool calls       33.3% [9.7, 70.0]% right call, 50.0% [18.8, 81.2]% right function, "
            "16.7% [3.0, 56.4]% unparseable, n=6 rows; 5 of them expect a call") in summary(r)
    assert r["tool_calls_expected"] == 5
    assert r["rows"]["tool_call_accuracy"] == "100001" and r["rows"]["tool_call_unparseable"] == "000010"
    labels = [row[0] for row in before_after_rows(r, r)]
    assert {"tool call accuracy (function and arguments)", "tool name accuracy (function)",
            "unparseable tool calls"} <= set(labels)

    # control: the same replies scored as text (contains) say something else, and no tool figures
    prompts_seen.clear()
    t = evaluate(_cfg(tmp_path, "contains"), m, smol_tok, "chatml", progress=False)
    assert "tool_call_accuracy" not in t and t["task_accuracy"] != r["task_accuracy"]
