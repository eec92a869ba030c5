"""Reasoning models: each assistant turn is trained exactly as inference generates it.

An independent reference, computed from the vendor's template alone (tests/data/templates/*.jinja,
each naming its source): for assistant turn ``i``,

- the prompt ``P`` is the template's generation prompt on the history as a chat client sends it
  (earlier replies without their reasoning);
- the trained text ``E`` is what the template renders after ``P`` when the conversation ends with
  the turn (its reasoning handed over the way the vendor's template reads it), up to and including
  the vendor's end-of-turn marker; where the template cannot render a reply's reasoning because its
  generation prompt already opened the block (DeepSeek-R1, QwQ, DeepSeek-V3.1), ``E`` is written
  out by hand in the vendor's output format: reasoning, closing tag, answer, marker.

That is compared with what ``sft data tokenize`` writes: the list of (text before each trained
run, the run) over all its examples must equal the list of (P, E) over all turns, so every turn is
trained exactly once, after exactly the inference prompt, and nothing else is trained.
"""

from __future__ import annotations

import copy
import io
import json
from typing import Any

import pytest

from sft.data.types import IGNORE

from .test_vendor_templates import TEMPLATES, TOOLS, _added

Row = list[dict[str, Any]]


def _a(content: str, reasoning: str | None = None, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"role": "assistant", "content": content, **kw}
    if reasoning is not None:
        d["reasoning_content"] = reasoning
    return d


def _u(content: str) -> dict[str, Any]:
    return {"role": "user", "content": content}


CALL = [{"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
CONVS: dict[str, Row] = {
    "single": [_u("Is 17 prime?"), _a("Yes, 17 is prime.", "17 is odd and no prime up to 4 divides it.")],
    "multi": [{"role": "system", "content": "Be brief."}, _u("2+2?"), _a("4", "Two plus two."), _u("Thanks"),
              _a("You are welcome."), _u("3+3?"), _a("6", "Three plus three.")],
    "no_reasoning": [_u("Hi"), _a("Hello!"), _u("2+2?"), _a("4")],
    "non_ascii": [_u("¿Qué tal? 你好 👋"), _a("Très bien — 谢谢! 🎉", "Saludo — 问候 ✓")],
    "whitespace": [_u("  padded  "), _a("Ends with a space ", "spaced reasoning  "), _u("again "),
                   _a("both sides  ")],
    # a reply written with <think> text in its content, in the row's own spacing
    "written": [_u("Is 17 prime?"), _a("<think>17 is odd ...</think>Yes, 17 is prime.")],
    "tool": [_u("Weather in Paris?"), _a("", tool_calls=CALL),
             {"role": "tool", "content": '{"temp": 21}', "name": "get_weather", "tool_call_id": "call00001"},
             _a("It is 21 degrees.", "The tool says 21.")],
}
REASONING = ("single", "multi", "non_ascii", "whitespace", "written")

# name: (template file, tokenizer, data.template_kwargs, end-of-turn markers, how the vendor's model
# writes a reply after a prompt that opened the block (None: the template renders it), conversations)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], tuple[str, ...], str | None, tuple[str, ...]]] = {
    "deepseek-r1-distill-qwen": ("deepseek-r1-distill.jinja", "deepseek", {}, ("<｜end▁of▁sentence｜>",),
                                 "{r}\n</think>\n\n{a}", (*REASONING, "no_reasoning")),
    "deepseek-r1-distill-llama": ("deepseek-r1-distill-llama.jinja", "deepseek", {}, ("<｜end▁of▁sentence｜>",),
                                  "{r}\n</think>\n\n{a}", (*REASONING, "no_reasoning")),
    "qwen3": ("qwen3.jinja", "smol", {}, ("<|im_end|>",), None, (*REASONING, "no_reasoning", "tool")),
    "qwen3-no-thinking": ("qwen3.jinja", "smol", {"enable_thinking": False}, ("<|im_end|>",), None,
                          ("no_reasoning",)),
    "qwq": ("qwq.jinja", "smol", {"enable_thinking": True}, ("<|im_end|>",), "{r}\n</think>\n\n{a}",
            (*REASONING, "no_reasoning", "tool")),
    "smollm3": ("smollm3.jinja", "smol", {}, ("<|im_end|>",), None, (*REASONING, "no_reasoning")),
    "smollm3-no-think": ("smollm3.jinja", "smol", {"enable_thinking": False}, ("<|im_end|>",), None,
                         ("no_reasoning",)),
    "gpt-oss": ("gpt-oss.jinja", "harmony", {"reasoning_effort": "high"}, ("<|return|>", "<|call|>"), None,
                ("single", "multi", "non_ascii", "whitespace", "no_reasoning", "tool")),
    "magistral": ("magistral.jinja", "magistral", {}, ("</s>",), None,
                  ("single", "multi", "non_ascii", "whitespace", "no_reasoning")),
    "deepseek-v3.1": ("deepseek-v3.1.jinja", "deepseek", {"thinking": True}, ("<｜end▁of▁sentence｜>",),
                      "{r}</think>{a}", (*REASONING, "no_reasoning")),
}
CASES = [(f, c) for f, spec in FAMILIES.items() for c in spec[5]]


def _think(tok: Any) -> Any:
    """The vendors' tokenizers (Qwen3, QwQ, DeepSeek) have <think> and </think> as added tokens."""
    tok = copy.deepcopy(tok)
    tok.add_tokens(["<think>", "</think>"])
    return tok


@pytest.fixture(scope="module")
def toks(smol_tok):
    return {
        "smol": _think(smol_tok),
        "deepseek": _think(_added(smol_tok, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
                                  bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>")),
        "harmony": _added(smol_tok, ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
                                     "<|constrain|>"], eos="<|return|>"),
        "magistral": _added(smol_tok, ["<s>", "</s>", "[INST]", "[/INST]", "[THINK]", "[/THINK]", "[SYSTEM_PROMPT]",
                                       "[/SYSTEM_PROMPT]", "[TOOL_CALLS]", "[ARGS]"], bos="<s>", eos="</s>"),
    }


def _split(m: dict[str, Any]) -> tuple[str | None, str]:
    """(reasoning, answer) of a row's assistant message, by hand for the rows above."""
    content = m["content"]
    if "</think>" in content:
        head, tail = content.split("</think>")
        return head.removeprefix("<think>"), tail
    return m.get("reasoning_content"), content


def _vendor_message(m: dict[str, Any], field: str, show: bool) -> dict[str, Any]:
    """A message as the vendor's template reads it; the reasoning (if ``show``) where it looks."""
    r, a = _split(m) if m["role"] == "assistant" else (None, m["content"])
    out = {k: v for k, v in m.items() if k != "reasoning_content"}
    out["content"] = a
    if r is None or not show:
        return out
    if field == "content":  # the reply as the row wrote it, or <think> text
        out["content"] = m["content"] if "</think>" in m["content"] else f"<think>\n{r}\n</think>\n\n{a}"
    elif field == "chunks":  # Magistral's thinking blocks
        out["content"] = [{"type": "thinking", "thinking": r}, {"type": "text", "text": a}]
    else:
        out[field] = r
    return out


def _field(family: str) -> str:
    return {"qwen3": "reasoning_content", "gpt-oss": "thinking", "magistral": "chunks"}.get(family, "content")


def reference(tok: Any, family: str, row: Row, tools: Any) -> list[tuple[str, str]]:
    """(prompt, trained text) of each assistant turn, from the template alone."""
    file, _, kwargs, markers, after_open, _ = FAMILIES[family]
    source = (TEMPLATES / file).read_text("utf-8")
    field = _field(family.removesuffix("-no-thinking"))

    def render(msgs: Row, gen: bool) -> str:
        if "<｜tool▁sep｜>" in source:  # DeepSeek's templates concatenate OpenAI's string arguments
            msgs = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
                c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in msgs]
        return str(tok.apply_chat_template(msgs, chat_template=source, tools=tools, add_generation_prompt=gen,
                                           tokenize=False, **kwargs))

    out = []
    for i, m in enumerate(row):
        if m["role"] != "assistant":
            continue
        history = [_vendor_message(h, field, show=False) for h in row[:i]]  # as a chat client sends it
        prompt = render(history, True)
        full = render([*history, _vendor_message(m, field, show=True)], False)
        r, _ = _split(m)
        tail = full[len(prompt):] if full.startswith(prompt) else None
        if tail is not None and (not r or r.strip() in tail) and (after_open is None or "</think>" in tail):
            end = max(tail.rfind(k) + len(k) for k in markers if k in tail)
            out.append((prompt, tail[:end]))
            continue
        # the template cannot show this reply's reasoning after its prompt, which opened the block:
        # the vendor's format, with the turn as the template renders it without reasoning
        opener = "<think>" + prompt.split("<think>")[-1]
        assert after_open is not None and prompt.endswith(opener) and opener.strip() == "<think>", (family, prompt)
        bare = render([*history, _vendor_message(m, field, show=False)], False)
        assert bare.startswith(prompt.removesuffix(opener))
        answer = bare[len(prompt) - len(opener):]
        answer = answer[: max(answer.rfind(k) + len(k) for k in markers if k in answer)]
        answer = answer.removeprefix("<think></think>")  # V3.1 writes an empty block before every reply
        if "</think>" in m["content"]:  # as written, less the "<think>" the prompt already has
            head = m["content"].split("</think>")[0].removeprefix("<think>")
            out.append((prompt, head + "</think>" + answer))
        else:
            out.append((prompt, after_open.format(r=r or "", a=answer)))
    return out


def _tokenize_cli(tmp_path, monkeypatch, tok, family: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``sft data tokenize`` on ``rows`` with the family's template and template_kwargs."""
    import sft.data.commands
    from sft.config import load_config

    file, _, kwargs, _, _, _ = FAMILIES[family]
    monkeypatch.setattr(sft.data.commands, "_tokenizer", lambda cfg: tok)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    (tmp_path / "t.jinja").write_text((TEMPLATES / file).read_text("utf-8"), "utf-8")
    (tmp_path / "c.yaml").write_text(
        f"model: smollm2-135m-instruct\ndata:\n  train: [train.jsonl]\n  template: t.jinja\n"
        f"  template_kwargs: {json.dumps(kwargs)}\n  max_length: 4096\n  cache_dir: {tmp_path / 'cache'}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert sft.data.commands.tokenize(cfg, str(tmp_path / "out.jsonl")) == 0
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def trained_runs(tok: Any, ex: dict[str, Any]) -> list[tuple[str, str]]:
    """(decoded text before the run, decoded run) for each run of trained tokens."""
    out, start = [], None
    ids, labels = ex["input_ids"], [*ex["labels"], IGNORE]
    for k, lab in enumerate(labels):
        if lab != IGNORE and start is None:
            start = k
        elif lab == IGNORE and start is not None:
            assert labels[start:k] == ids[start:k]  # trained labels are the input ids
            dec = lambda xs: tok.decode(xs, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
            out.append((dec(ids[:start]), dec(ids[start:k])))
            start = None
    return out


@pytest.mark.parametrize(("family", "name"), CASES)
def test_every_turn_is_trained_as_inference_generates_it(tmp_path, monkeypatch, toks, family, name):
    tok = toks[FAMILIES[family][1]]
    row = copy.deepcopy(CONVS[name])
    tools = TOOLS if name == "tool" else None
    record = {"messages": row, **({"tools": tools} if tools else {})}
    examples = _tokenize_cli(tmp_path, monkeypatch, tok, family, [record])
    got = [run for ex in examples for run in trained_runs(tok, ex)]
    assert got == reference(tok, family, row, tools)


def test_r1_reasoning_is_trained_after_the_prompts_think(tmp_path, monkeypatch, toks):
    """Issue: R1's reasoning was never trained (its template cuts everything up to </think>)."""
    tok = toks["deepseek"]
    (ex,) = _tokenize_cli(tmp_path, monkeypatch, tok, "deepseek-r1-distill-qwen", [{"messages": CONVS["written"]}])
    ((prompt, trained),) = trained_runs(tok, ex)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>Is 17 prime?<｜Assistant｜><think>\n"
    assert trained == "17 is odd ...</think>Yes, 17 is prime.<｜end▁of▁sentence｜>"
    # control: the template's own rendering of the reply has lost the reasoning
    rendered = tok.apply_chat_template(CONVS["written"], chat_template=(TEMPLATES / "deepseek-r1-distill.jinja")
                                       .read_text("utf-8"), tokenize=False)
    assert "17 is odd" not in rendered
    from sft.data.chat import lint

    warnings = lint(tok, (TEMPLATES / "deepseek-r1-distill.jinja").read_text("utf-8"))
    assert not any("drops reasoning" in w or "generation prompt ends with" in w for w in warnings), warnings


@pytest.mark.parametrize("template", ["qwen2.5.jinja", "llama3.2.jinja", "phi3.5.jinja", "phi4.jinja", "mistral.jinja"])
def test_reply_in_a_format_the_template_does_not_know_is_trained_as_written(tmp_path, monkeypatch, smol_tok, template):
    """Issue: templates with no reasoning convention trained '<think>\\n17 ...\\n</think>\\n\\n': not the row."""
    FAMILIES["_plain"] = (template, "smol", {}, (), None, ())
    try:
        row = [_u("Is 17 prime?"), _a("<think>17 is odd ...</think>Yes, 17 is prime.")]
        (ex,) = _tokenize_cli(tmp_path, monkeypatch, smol_tok, "_plain", [{"messages": row}])
    finally:
        del FAMILIES["_plain"]
    ((_, trained),) = trained_runs(smol_tok, ex)
    assert trained.startswith("<think>17 is odd ...</think>Yes, 17 is prime.")  # byte for byte, then the marker
    assert trained.removeprefix("<think>17 is odd ...</think>Yes, 17 is prime.") in ("<|im_end|>", "<|eot_id|>",
                                                                                   "<|end|>", "</s>")


def test_template_kwargs_are_recorded_in_final_tokenizer(tmp_path, toks):
    """data.template_kwargs are written into the template, so final/'s tokenizer renders the same
    with plain transformers (no kwargs passed), and a caller can still pass another value."""
    from transformers import AutoTokenizer

    from sft.data.chat import resolve_template
    from sft.models.save import finalize_tokenizer

    tok = toks["smol"]
    source = resolve_template(str(TEMPLATES / "qwen3.jinja"), tok, ".", {"enable_thinking": False})
    final, _, _ = finalize_tokenizer(tok, source)
    final.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [_u("2+2?")]
    vendor = (TEMPLATES / "qwen3.jinja").read_text("utf-8")
    off = tok.apply_chat_template(msgs, chat_template=vendor, add_generation_prompt=True, tokenize=False,
                                  enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == off
    on = loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    assert on.endswith("<|im_start|>assistant\n")  # control: the kwarg is a default, not a lock


def test_template_kwargs_errors(smol_tok):
    from sft.data.chat import resolve_template
    from sft.errors import SftError

    with pytest.raises(SftError, match=r"data.template_kwargs: 'bad-name' is not a template variable name"):
        resolve_template("chatml", smol_tok, ".", {"bad-name": True})
    with pytest.raises(SftError, match=r"data.template_kwargs.x: \[1\] is not a string, number, boolean or null"):
        resolve_template("chatml", smol_tok, ".", {"x": [1]})


def test_readme_worked_example_preview(tmp_path, monkeypatch, smol_tok):
    """The README's `sft data preview examples/reasoning/r1.yaml -n 6` lines, and qwen3.yaml's."""
    from sft.config import load_config
    from sft.data import commands

    monkeypatch.setattr(commands, "_tokenizer", lambda cfg: smol_tok)  # the model's own, already loaded
    examples = TEMPLATES.parents[2] / "examples" / "reasoning"
    shown = {}
    for name in ("r1", "qwen3"):
        cfg = load_config(examples / f"{name}.yaml")
        cfg.data.cache_dir = str(tmp_path / name)
        out = io.StringIO()
        assert commands.preview(cfg, n=6, stream=out, color=False) == 0
        shown[name] = out.getvalue()
    r1 = "\n".join(line for line in shown["r1"].splitlines() if line)
    assert ("<|im_start|><｜User｜>What is 17 * 3?<｜Assistant｜>51.<｜end▁of▁sentence｜><｜User｜>And plus 9?"
            "<｜Assistant｜><think>\n[[51 + 9 = 60.\n</think>\n60.<｜end▁of▁sentence｜>]]") in r1
    assert "<|im_start|><｜User｜>Say hello.<｜Assistant｜><think>\n[[\n</think>\nHello!<｜end▁of▁sentence｜>]]" in r1
    assert ("<|im_start|>assistant\n51.<|im_end|>\n<|im_start|>user\nAnd plus 9?<|im_end|>\n<|im_start|>assistant\n"
            "[[<think>\n51 + 9 = 60.\n</think>\n\n60.<|im_end|>]]") in shown["qwen3"]


@pytest.mark.parametrize(("family", "template_kwargs"), [("qwen3", {"enable_thinking": False}),
                                                         ("smollm3", {"enable_thinking": False}),
                                                         ("deepseek-v3.1", {"thinking": False})])
def test_reasoning_rows_when_thinking_is_off_are_an_error(toks, family, template_kwargs):
    """With thinking off the prompt closes an empty block: a reply with reasoning cannot be trained
    as inference generates it. Control: data.reasoning: drop trains the answer."""
    from sft.data.chat import encode_all, resolve_template
    from sft.data.formats import parse_row
    from sft.errors import SftError

    file, tok_name = FAMILIES[family][0], FAMILIES[family][1]
    source = resolve_template(str(TEMPLATES / file), toks[tok_name], ".", template_kwargs)
    conv, _ = parse_row({"messages": CONVS["single"]}, "messages")
    assert conv is not None
    conv.source, conv.line = "t.jsonl", 4
    with pytest.raises(SftError, match=r"t.jsonl:4: messages\[1\] has reasoning, but the template's generation "
                                       r"prompt closes an empty reasoning block"):
        encode_all(conv, toks[tok_name], source, "assistant")
    (ex,) = encode_all(conv, toks[tok_name], source, "assistant", reasoning="drop")
    assert toks[tok_name].decode([t for t in ex.labels if t != IGNORE]).startswith("Yes, 17 is prime.")


@pytest.mark.parametrize(("family", "template_kwargs"), [("qwen3", {"enable_thinking": False}),
                                                         ("deepseek-v3.1", {"thinking": False})])
def test_lint_with_thinking_off_warns_instead_of_failing(toks, family, template_kwargs):
    """`sft data check` lints every template with a reasoning probe: with thinking off that probe is
    refused, which must become a warning (plain rows still train), not the command's error.
    Control: encoding the probe itself is the error."""
    from sft.data.chat import encode_all, lint, resolve_template
    from sft.data.types import Conversation, Message
    from sft.errors import SftError

    file, tok_name = FAMILIES[family][0], FAMILIES[family][1]
    source = resolve_template(str(TEMPLATES / file), toks[tok_name], ".", template_kwargs)
    warnings = lint(toks[tok_name], source)
    assert "data.template: thinking is off in this template, so rows with reasoning are refused" in warnings
    probe = Conversation([Message("user", "2+2?"), Message("assistant", "4", reasoning="Two plus two.")])
    with pytest.raises(SftError, match="thinking is off"):
        encode_all(probe, toks[tok_name], source, "assistant")
