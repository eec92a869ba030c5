"""Exact masks under the vendors' own chat templates (tests/data/templates/*.jinja, each naming its source).

For every template and conversation: ``input_ids`` equal ``apply_chat_template``, and the trained
tokens are exactly each assistant turn as the template renders it after the generation prompt
(reasoning and tool calls included) plus its end-of-turn marker. The expectations are derived here
from the template's own renderings and the vendor's marker, written out by hand, not from sft's code.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest

from sft.data.chat import encode_all, end_of_turn_tokens, lint, prompt_ids, resolve_template
from sft.data.types import IGNORE, Conversation
from sft.data.types import Message as M
from sft.errors import SftError

TEMPLATES = Path(__file__).parent / "templates"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _call(args):
    return [{"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": args}}]


CONVS = {
    "single": [M("user", "Hi"), M("assistant", "Hello!")],
    "multi": [M("system", "Be brief."), M("user", "Hi"), M("assistant", "Hello!"), M("user", "2+2?"),
              M("assistant", "4"), M("user", "Thanks"), M("assistant", "You are welcome.")],
    "reasoning": [M("user", "2+2?"), M("assistant", "4", reasoning="Two plus two."), M("user", "3+3?"),
                  M("assistant", "6", reasoning="Three plus three.")],
    "tool": [M("user", "Weather in Paris?"), M("assistant", "", tool_calls=_call({"city": "Paris"})),
             M("tool", '{"temp": 21}', name="get_weather", tool_call_id="call00001"),
             M("assistant", "It is 21 degrees.")],
    "tool_later": [M("user", "Hi"), M("assistant", "Hello! Ask me about the weather."), M("user", "Paris?"),
                   M("assistant", "", tool_calls=_call({"city": "Paris"})),
                   M("tool", '{"temp": 21}', name="get_weather", tool_call_id="call00001"),
                   M("assistant", "It is 21 degrees.")],
    "non_ascii": [M("user", "¿Qué tal? 你好 👋"), M("assistant", "Très bien — 谢谢! 🎉"), M("user", "Ünïcödé?"),
                  M("assistant", "Ja, natürlich. ✓")],
    "whitespace": [M("user", "  padded  "), M("assistant", "\nStarts with a newline, ends with a space "),
                   M("user", "again"), M("assistant", "  both sides  \n")],
}

# name: (template file, tokenizer, the vendor's end-of-turn marker, conversations it supports)
ALL = ("single", "multi", "reasoning", "non_ascii", "whitespace")
VENDORS = {
    "qwen2.5": ("qwen2.5.jinja", "smol", "<|im_end|>", (*ALL, "tool", "tool_later")),
    "qwen3": ("qwen3.jinja", "smol", "<|im_end|>", (*ALL, "tool", "tool_later")),
    # DeepSeek-R1 and the other reasoning families: tests/data/test_reasoning_templates.py
    "llama3.2": ("llama3.2.jinja", "llama", "<|eot_id|>", (*ALL, "tool", "tool_later")),
    "mistral": ("mistral.jinja", "mistral", "</s>", (*ALL, "tool", "tool_later")),  # </s> as plain text
    "phi3.5": ("phi3.5.jinja", "smol", "<|end|>", ALL),  # <|end|> as plain text
    "phi3.5-special": ("phi3.5.jinja", "phi", "<|end|>", ALL),  # Phi's own special tokens
    "phi4": ("phi4.jinja", "smol", "<|im_end|>", ALL),
    "gemma3": ("gemma3.jinja", "gemma", "<end_of_turn>", ALL),
}
CASES = [(v, c) for v, (_, _, _, convs) in VENDORS.items() for c in convs]


def _added(tok, special: list[str], bos: str | None = None, eos: str | None = None):
    """A copy of ``tok`` with the vendor's special tokens added (they are plain text otherwise)."""
    t = copy.deepcopy(tok)
    if special:
        t.add_tokens(special, special_tokens=True)
    if bos:
        t.bos_token = bos
    if eos:
        t.eos_token = eos
    return t


@pytest.fixture(scope="module")
def toks(smol_tok, gemma_tok):
    return {
        "smol": smol_tok,
        "gemma": gemma_tok,
        "llama": _added(smol_tok, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                        bos="<|begin_of_text|>", eos="<|eot_id|>"),
        # <｜User｜> and <｜Assistant｜> stay plain text: headers that are not special tokens
        "deepseek": _added(smol_tok, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
                           bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>"),
        "mistral": _added(smol_tok, [], bos="<s>", eos="</s>"),
        "phi": _added(smol_tok, ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], eos="<|endoftext|>"),
    }


def _source(vendor: str) -> str:
    return (TEMPLATES / VENDORS[vendor][0]).read_text("utf-8")


def _conv(vendor: str, name: str) -> list[M]:
    msgs = copy.deepcopy(CONVS[name])
    return msgs


def _view(msgs: list[M], keep: int | None, field: bool) -> list[dict]:
    """The messages as a chat client sends them: only message ``keep`` shows its reasoning, as
    ``reasoning_content`` (templates that read it) or as <think> text in the content."""
    out = []
    for i, m in enumerate(msgs):
        d = {k: v for k, v in (("role", m.role), ("content", m.content), ("tool_calls", m.tool_calls),
                               ("name", m.name), ("tool_call_id", m.tool_call_id)) if v is not None}
        if m.reasoning is not None and i == keep:
            if field:
                d["reasoning_content"] = m.reasoning
            else:
                d["content"] = f"<think>\n{m.reasoning}\n</think>\n\n{m.content}"
        out.append(d)
    return out


def _apply(tok, source, messages, gen=False, tokenize=False, tools=None):
    if source and "<｜tool▁sep｜>" in source:  # DeepSeek's template concatenates OpenAI's string arguments
        messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
            c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    out = tok.apply_chat_template(messages, chat_template=source, tools=tools, add_generation_prompt=gen,
                                  tokenize=tokenize)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out) if tokenize else out


def _turn_text(tok, source, vendor, msgs, i, tools) -> tuple[str, int, int]:
    """(rendering ending with turn i, start, end of the turn's trained text), from renderings alone."""
    field = "reasoning_content" in source
    prompt = _apply(tok, source, _view(msgs[:i], None, field), gen=True, tools=tools)
    full = _apply(tok, source, _view(msgs[: i + 1], i, field), tools=tools)
    if vendor == "deepseek-r1-distill" and msgs[i - 1].role != "tool":
        # its generation prompt opens <think>, which turns never render
        assert prompt.endswith("<｜Assistant｜><think>\n")
        prompt = prompt[: -len("<think>\n")]
    if vendor == "mistral" and msgs[0].role == "system":
        # Mistral writes the system prompt only into the last user turn, so only the prompt has it:
        # inference sees the prompt, then the model writes what follows [/INST] in the turn
        assert not full.startswith(prompt) and msgs[0].content in prompt
        full = prompt + full[full.rindex("[/INST]") + len("[/INST]"):]
    assert full.startswith(prompt)
    marker = VENDORS[vendor][2]
    return full, len(prompt), full.rindex(marker) + len(marker)


def _same_ids(tok, ex, ids: list[int]) -> bool:
    """The template's tokens, except that a reply whose first token would merge with the prompt's
    last is tokenized apart (inference tokenizes the prompt alone): then the same text."""
    if ex.meta.get("merged_starts"):
        return ex.input_ids != ids and tok.decode(ex.input_ids) == tok.decode(ids)
    return ex.input_ids == ids


def _labels(tok, text: str, regions: list[tuple[int, int]]) -> list[int]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    cuts = [s for s, _ in regions if any(a < s < b for a, b in enc["offset_mapping"])]
    ids, offsets, bounds = [], [], [0, *cuts, len(text)]
    for a0, b0 in itertools.pairwise(bounds):  # tokenized apart at a reply that would merge with its prompt
        piece = tok(text[a0:b0], add_special_tokens=False, return_offsets_mapping=True)
        ids += piece["input_ids"]
        offsets += [(a0 + a, a0 + b) for a, b in piece["offset_mapping"]]
    labels = [t if any(b > s and a < e for s, e in regions) else IGNORE for t, (a, b) in zip(ids, offsets)]
    return [IGNORE, *labels[1:]]


def _runs(ex) -> list[list[int]]:
    runs: list[list[int]] = [[]]
    for lab in ex.labels:
        if lab == IGNORE:
            runs.append([])
        else:
            runs[-1].append(lab)
    return [r for r in runs if r]


@pytest.mark.parametrize(("vendor", "name"), CASES)
def test_vendor_template_masks_are_exact(toks, vendor, name):
    _, tok_name, marker, _ = VENDORS[vendor]
    tok, source = toks[tok_name], _source(vendor)
    msgs = _conv(vendor, name)
    tools = TOOLS if name.startswith("tool") else None
    field = "reasoning_content" in source
    examples = encode_all(Conversation(msgs, tools=tools), tok, source, "assistant")
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    last = turns[-1]
    if len(examples) == 1:  # one example: the whole conversation, each turn trained in place
        full = _apply(tok, source, _view(msgs, last, field), tools=tools)
        assert _same_ids(tok, examples[0], _apply(tok, source, _view(msgs, last, field), tokenize=True, tools=tools))
        regions = []
        for i in turns:
            text, start, end = _turn_text(tok, source, vendor, msgs, i, tools)
            assert full.startswith(text[:end])  # the turn is rendered the same inside the conversation
            regions.append((start, end))
        expected = [(full, regions)]
    else:  # one example per turn, history as inference renders it
        assert [ex.meta["turn"] for ex in examples] == turns
        expected = []
        for i, ex in zip(turns, examples):
            text, start, end = _turn_text(tok, source, vendor, msgs, i, tools)
            if vendor == "mistral":
                assert _same_ids(tok, ex, tok(text, add_special_tokens=False)["input_ids"])
            else:
                assert _same_ids(tok, ex, _apply(tok, source, _view(msgs[: i + 1], i, field), tokenize=True, tools=tools))
            expected.append((text, [(start, end)]))
    for ex, (text, regions) in zip(examples, expected):
        assert ex.labels == _labels(tok, text, regions)
        for run, (s, e) in zip(_runs(ex), regions):
            decoded = tok.decode(run)
            assert decoded.endswith(text[s:e]) and decoded.endswith(marker), (decoded, text[s:e])
    for ex in examples:  # every trained turn ends with the marker, and nothing else is trained
        assert sum(len(r) for r in _runs(ex)) == ex.num_trained


@pytest.mark.parametrize(("vendor", "name"), CASES)
def test_linear_time_regions_equal_the_per_turn_method(toks, vendor, name, monkeypatch):
    """The content-span fast path (used where probes vouch for a template) changes nothing."""
    from sft.data import chat

    tok, source = toks[VENDORS[vendor][1]], _source(vendor)
    conv = Conversation(_conv(vendor, name), tools=TOOLS if name.startswith("tool") else None)
    fast = encode_all(conv, tok, source, "assistant")
    monkeypatch.setattr(chat, "turn_regions", lambda *a, **k: None)
    assert encode_all(conv, tok, source, "assistant") == fast


def test_fast_path_is_used_only_where_probes_vouch_for_it(toks):
    from sft.data.spans import regular as _regular

    regular = {v: _regular(toks[t], _source(v)) for v, (_, t, _, _) in VENDORS.items()}
    assert regular == {"qwen2.5": True, "qwen3": False, "llama3.2": True,
                       "mistral": False, "phi3.5": True, "phi3.5-special": True, "phi4": True, "gemma3": True}


def test_gemma3_renders_like_the_builtin_gemma(gemma_tok):
    msgs = [{"role": "system", "content": "Sys"}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello!"}]
    ours = resolve_template("gemma", gemma_tok)
    assert _apply(gemma_tok, _source("gemma3"), msgs) == _apply(gemma_tok, ours, msgs) == (
        "<bos><start_of_turn>user\nSys\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n")
    assert end_of_turn_tokens(gemma_tok, _source("gemma3")) == ("<end_of_turn>", [106])


def _trained_texts(tok, examples) -> list[str]:
    return [tok.decode(r) for ex in examples for r in _runs(ex)]


def test_qwen3_reasoning_turns_are_trained_with_history_as_inference_sends_it(smol_tok):
    """Issue: multi-turn rows with reasoning were rejected; a reply starting with a newline too."""
    source = _source("qwen3")
    msgs = CONVS["reasoning"]
    examples = encode_all(Conversation(msgs), smol_tok, source, "assistant")
    assert _trained_texts(smol_tok, examples) == [
        "<think>\nTwo plus two.\n</think>\n\n4<|im_end|>",
        "<think>\nThree plus three.\n</think>\n\n6<|im_end|>",
    ]
    second = smol_tok.decode(examples[1].input_ids)
    assert "<|im_start|>assistant\n4<|im_end|>" in second and "Two plus two." not in second  # history without it
    # control: the whole conversation in one rendering has lost the first turn's reasoning
    assert "Two plus two." not in _apply(smol_tok, source, _view(msgs, 3, True))
    # keep_last with a single trained turn (last_assistant) is one example; drop trains no reasoning
    (last,) = encode_all(Conversation(msgs), smol_tok, source, "last_assistant")
    assert _trained_texts(smol_tok, [last]) == ["<think>\nThree plus three.\n</think>\n\n6<|im_end|>"]
    dropped = encode_all(Conversation(msgs), smol_tok, source, "assistant", reasoning="drop")
    assert _trained_texts(smol_tok, dropped) == ["<think>\n\n</think>\n\n4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"]
    newline = encode_all(Conversation(CONVS["whitespace"]), smol_tok, source, "last_assistant")
    assert _trained_texts(smol_tok, newline) == ["<think>\n\n</think>\n\n  both sides  \n<|im_end|>"]


@pytest.mark.parametrize("vendor", ["phi3.5", "phi3.5-special", "mistral"])
def test_plain_text_end_of_turn_is_trained_the_same_in_every_turn(toks, vendor):
    """Issue: a marker that is not a special token was never trained; Phi-3.5's last turn differed."""
    _, tok_name, marker, _ = VENDORS[vendor]
    tok, source = toks[tok_name], _source(vendor)
    examples = encode_all(Conversation(CONVS["multi"][1:]), tok, source, "assistant")
    assert _trained_texts(tok, examples) == [f"Hello!{marker}", f"4{marker}", f"You are welcome.{marker}"]
    ex = examples[-1]
    text, ids = end_of_turn_tokens(tok, source)
    assert text == marker and tok.decode(ids) == marker
    assert len(ids) == (1 if vendor == "phi3.5-special" else len(tok(marker, add_special_tokens=False)["input_ids"]))
    if vendor.startswith("phi"):  # Phi-3.5 appends the EOS once after the last turn: rendered, not trained
        rendered = tok.decode(ex.input_ids)
        assert rendered.endswith(f"welcome.{marker}\n{tok.eos_token}")
        assert ex.labels[-1] == IGNORE


def test_final_tokenizer_prompts_are_prefixes_of_the_training_rendering(smol_tok, tmp_path):
    """Train = inference: final/'s tokenizer (saved with the training template) renders each turn's
    prompt exactly as the first tokens of that turn's training example, and training starts there."""
    from transformers import AutoTokenizer

    from sft.models.save import finalize_tokenizer

    source = _source("qwen3")
    tok, _, _ = finalize_tokenizer(smol_tok, source)
    tok.save_pretrained(str(tmp_path))
    final = AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = CONVS["reasoning"] + [M("user", "4+4?"), M("assistant", "8", reasoning="Four plus four.")]
    examples = encode_all(Conversation(msgs), smol_tok, source, "assistant")
    assert len(examples) == 3
    for ex in examples:
        history = [{"role": m.role, "content": m.content} for m in msgs[: ex.meta["turn"]]]  # no reasoning, as clients send
        prompt = _apply(final, None, history, gen=True, tokenize=True)
        assert ex.input_ids[: len(prompt)] == prompt
        assert next(k for k, lab in enumerate(ex.labels) if lab != IGNORE) == len(prompt)
        assert prompt == prompt_ids(msgs[: ex.meta["turn"]], smol_tok, source)  # what sft generate/chat send
    # control: the one-example rendering of the whole conversation is not what inference sees for turn 1
    whole = _apply(final, None, _view(msgs, 5, True), tokenize=True)
    assert whole[: len(examples[0].input_ids)] != examples[0].input_ids


def test_builtin_chatml_and_llama3_use_parsable_tool_formats(smol_tok, toks):
    msgs = CONVS["tool"]
    (ex,) = encode_all(Conversation(msgs, tools=TOOLS), smol_tok, resolve_template("chatml", smol_tok), "assistant")
    assert _trained_texts(smol_tok, [ex]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees.<|im_end|>",
    ]
    text = smol_tok.decode(ex.input_ids)
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>" in text  # not trained
    llama = toks["llama"]
    (ex,) = encode_all(Conversation(msgs, tools=TOOLS), llama, resolve_template("llama3", llama), "assistant")
    assert _trained_texts(llama, [ex]) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21 degrees.<|eot_id|>"]
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp\": 21}<|eot_id|>" in llama.decode(ex.input_ids)


def test_builtin_chatml_reasoning_keep_all_is_one_example(smol_tok):
    source = resolve_template("chatml", smol_tok)
    msgs = CONVS["reasoning"]
    (ex,) = encode_all(Conversation(msgs), smol_tok, source, "assistant", reasoning="keep_all")
    assert _trained_texts(smol_tok, [ex]) == [
        "<think>\nTwo plus two.\n</think>\n\n4<|im_end|>", "<think>\nThree plus three.\n</think>\n\n6<|im_end|>"]
    # keep_last: each turn keeps its own reasoning, history does not: one example per turn
    keep_last = encode_all(Conversation(msgs), smol_tok, source, "assistant")
    assert [ex.meta["turn"] for ex in keep_last] == [1, 3]
    assert _trained_texts(smol_tok, keep_last) == _trained_texts(smol_tok, [ex])


def _cli_config(tmp_path, monkeypatch, smol_tok, row, template):
    import sft.models.load
    from sft.config import load_config

    monkeypatch.setattr(sft.models.load, "load_tokenizer", lambda name, trust_remote_code=False, **kw: smol_tok)
    (tmp_path / "train.json").write_text(json.dumps([row]))
    (tmp_path / "c.yaml").write_text(
        f"model: smollm2-135m-instruct\ndata:\n  train: [train.json]\n  template: {template}\n"
        f"  cache_dir: {tmp_path / 'cache'}\n")
    return load_config(tmp_path / "c.yaml")


GLAIVE_ROW = {  # the shape of glaive_toolcall_en_demo.json rows
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": json.dumps([TOOLS[0]["function"]]),
}


def test_preview_marks_tool_calls_trained_and_tool_output_not(tmp_path, monkeypatch, smol_tok):
    import io

    from sft.data import commands

    out = io.StringIO()
    commands.preview(_cli_config(tmp_path, monkeypatch, smol_tok, GLAIVE_ROW, "chatml"), stream=out, color=False)
    text = out.getvalue()
    assert ('<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n[[It is 21 degrees.<|im_end|>]]") in text
    assert text.split("===", 1)[1].count("[[") == 2  # nothing else is trained: not the tools, not the tool output


def test_preview_and_check_of_reasoning_under_qwen3(tmp_path, monkeypatch, smol_tok):
    import io

    from sft.data import commands

    (tmp_path / "qwen3.jinja").write_text(_source("qwen3"))
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\n4"},
                        {"role": "user", "content": "3+3?"},
                        {"role": "assistant", "content": "6", "reasoning_content": "Three plus three."}]}
    cfg = _cli_config(tmp_path, monkeypatch, smol_tok, row, "qwen3.jinja")
    out = io.StringIO()
    commands.preview(cfg, stream=out, color=False)
    text = out.getvalue()
    assert "example 1 of 2 (one per assistant turn)" in text and "example 2 of 2" in text
    assert "<|im_start|>assistant\n[[<think>\nTwo plus two.\n</think>\n\n4<|im_end|>]]" in text
    assert "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n" in text  # history untrained
    assert "<|im_start|>assistant\n[[<think>\nThree plus three.\n</think>\n\n6<|im_end|>]]" in text
    out = io.StringIO()
    assert commands.check(cfg, as_json=True, stream=out) == 0
    result = json.loads(out.getvalue())
    assert result["end_of_turn"] == {"text": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}
    assert result["examples"] == 2
    out = io.StringIO()
    commands.check(cfg, stream=out)
    assert "end of turn (trained after every assistant turn): '<|im_end|>' = special token ['<|im_end|>'] [2]" in out.getvalue()


def test_builtin_tool_formats_are_the_vendors(smol_tok, toks):
    """chatml writes tools, calls and results exactly as Qwen3's template does; llama3 trains the
    same call text as Llama 3.2's template."""
    msgs = [m.to_template() for m in CONVS["tool"][:3]]
    qwen3 = _apply(smol_tok, _source("qwen3"), msgs, gen=True, tools=TOOLS)
    assert _apply(smol_tok, resolve_template("chatml", smol_tok), msgs, gen=True, tools=TOOLS) == qwen3
    assert _apply(smol_tok, _source("qwen2.5"), msgs, gen=True, tools=TOOLS) != qwen3  # control: its default system
    llama = toks["llama"]
    conv = Conversation(CONVS["tool"], tools=TOOLS)
    ours = encode_all(conv, llama, resolve_template("llama3", llama), "assistant")
    vendor = encode_all(conv, llama, _source("llama3.2"), "assistant")
    assert _trained_texts(llama, ours) == _trained_texts(llama, vendor)


def test_lint_says_which_templates_split_conversations(toks):
    def split(vendor):
        tok = toks[VENDORS[vendor][1]]
        return any("one example per assistant turn" in w for w in lint(tok, _source(vendor)))

    assert split("qwen3") and split("mistral") is False  # Mistral splits only with a system prompt
    assert not split("phi3.5")  # its EOS after the last turn is not a rewrite of history
    assert not split("qwen2.5") and not split("llama3.2")


def test_templates_without_tools_reject_tool_rows(toks, gemma_tok):
    for vendor in ("phi3.5", "phi4"):  # they would silently drop the tools and the calls
        tok = toks[VENDORS[vendor][1]]
        with pytest.raises(SftError, match=r"t.jsonl:3: the row's tools \('get_weather'\) are not in the prompt"):
            encode_all(Conversation(CONVS["tool"], tools=TOOLS, source="t.jsonl", line=3), tok, _source(vendor),
                       "assistant")
        with pytest.raises(SftError, match=r"t.jsonl:3: messages\[1\] has tool calls, which this chat template"):
            encode_all(Conversation(CONVS["tool"], source="t.jsonl", line=3), tok, _source(vendor), "assistant")
    plain = [m for m in CONVS["tool"] if m.role in ("user", "assistant") and not m.tool_calls]
    encode_all(Conversation(plain[:2], source="t.jsonl", line=3), toks[VENDORS["phi4"][1]], _source("phi4"),
               "assistant")  # control: without tools the same template is fine
    with pytest.raises(SftError, match=r"t.jsonl:3: the chat template failed.*alternate"):
        encode_all(Conversation(CONVS["tool"], tools=TOOLS, source="t.jsonl", line=3), gemma_tok,
                   _source("gemma3"), "assistant")


def test_reply_merging_with_the_prompt_is_counted(toks):
    tok, source = toks["smol"], _source("qwen2.5")  # no lstrip: "assistant\n" + "\nStarts" -> "\n\n"
    (ex,) = encode_all(Conversation(CONVS["whitespace"], source="w.jsonl", line=1), tok, source, "assistant")
    assert ex.meta["merged_starts"] == 1
    assert any("1 rows have a reply whose first token would merge" in w and "w.jsonl:1" in w for w in lint(tok, source, [ex]))
    prompt = _apply(tok, source, [{"role": "user", "content": "  padded  "}], gen=True, tokenize=True)
    assert ex.input_ids[: len(prompt)] == prompt  # the prompt's tokens, as inference has them
    assert ex.labels[len(prompt)] != IGNORE and ex.labels[len(prompt) - 1] == IGNORE
    (plain,) = encode_all(Conversation(CONVS["multi"]), tok, source, "assistant")
    assert "merged_starts" not in plain.meta  # control


def test_reasoning_goes_to_the_field_the_template_reads(smol_tok):
    thinking = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.thinking is defined %}"
                "{{ '[T]' + m.thinking + '[/T]' }}{% endif %}{{ m.content + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (ex,) = encode_all(Conversation(CONVS["reasoning"][:2]), smol_tok, thinking, "assistant")
    assert _trained_texts(smol_tok, [ex]) == ["[T]Two plus two.[/T]4<|im_end|>"]
    (ex,) = encode_all(Conversation(CONVS["reasoning"][:2]), smol_tok, resolve_template("chatml", smol_tok), "assistant")
    assert _trained_texts(smol_tok, [ex]) == ["<think>\nTwo plus two.\n</think>\n\n4<|im_end|>"]  # written as text
