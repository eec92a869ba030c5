"""Exact input_ids and labels for real tokenizers; masks for arbitrary templates; linear time."""

from __future__ import annotations

import pytest

from sft.data.chat import TRAIN_ON, encode, lint, prompt_ids, resolve_template, stop_token_ids
from sft.data.types import IGNORE, Conversation, Example
from sft.data.types import Message as M
from sft.errors import SftError

X = IGNORE

CONVS = {
    "one": [M("user", "Hi"), M("assistant", "Hello!")],
    "two": [M("user", "Hi"), M("assistant", "Hello!"), M("user", "2+2?"), M("assistant", "4")],
    "four": [
        M("system", "Be brief."), M("user", "Hi"), M("assistant", "Hey."), M("user", "Name?"),
        M("assistant", "Bot.", train=False), M("user", "2+2?"), M("assistant", "4"), M("user", "Bye"),
        M("assistant", " Bye! "),
    ],
}

# Golden tokens: (tokenizer, conversation) -> input_ids; (tokenizer, conversation, train_on) -> labels.
# smol = SmolLM2's own ChatML template (data.template: auto; it adds a default system prompt when
# there is none); gemma = Gemma's tokenizer with the built-in `gemma` template (trims content).
# <|im_end|> is 2 (== eos == pad in SmolLM2), <end_of_turn> is 106, Gemma's <bos> is 2.
GOLDEN = {
    ("smol", "one"): [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198],
    ("smol", "one", "assistant"): [X] * 31 + [19556, 17, 2] + [X] * 1,
    ("smol", "one", "last_assistant"): [X] * 31 + [19556, 17, 2] + [X] * 1,
    ("smol", "one", "all"): [X] * 1 + [9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198],
    ("smol", "two"): [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198],
    ("smol", "two", "assistant"): [X] * 31 + [19556, 17, 2] + [X] * 14 + [36, 2] + [X] * 1,
    ("smol", "two", "last_assistant"): [X] * 48 + [36, 2] + [X] * 1,
    ("smol", "two", "all"): [X] * 1 + [9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 19556, 17, 2, 198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198],
    ("smol", "four"): [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 22234, 30, 2, 198, 1, 4093, 198, 5820, 47, 2, 198, 1, 520, 9531, 198, 24412, 30, 2, 198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198, 1, 4093, 198, 3087, 85, 2, 198, 1, 520, 9531, 198, 1428, 85, 17, 216, 2, 198],
    ("smol", "four", "assistant"): [X] * 18 + [22234, 30, 2] + [X] * 29 + [36, 2] + [X] * 12 + [1428, 85, 17, 216, 2] + [X] * 1,
    ("smol", "four", "last_assistant"): [X] * 64 + [1428, 85, 17, 216, 2] + [X] * 1,
    ("smol", "four", "all"): [X] * 1 + [9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 22234, 30, 2, 198, 1, 4093, 198, 5820, 47, 2, 198, 1, 520, 9531, 198] + [X] * 2 + [2, 198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198, 1, 4093, 198, 3087, 85, 2, 198, 1, 520, 9531, 198, 1428, 85, 17, 216, 2, 198],
    ("gemma", "one"): [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107, 9259, 236888, 106, 107],
    ("gemma", "one", "assistant"): [X] * 10 + [9259, 236888, 106] + [X] * 1,
    ("gemma", "one", "last_assistant"): [X] * 10 + [9259, 236888, 106] + [X] * 1,
    ("gemma", "one", "all"): [X] * 1 + [105, 2364, 107, 10979, 106, 107, 105, 4368, 107, 9259, 236888, 106, 107],
    ("gemma", "two"): [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107, 9259, 236888, 106, 107, 105, 2364, 107, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107, 236812, 106, 107],
    ("gemma", "two", "assistant"): [X] * 10 + [9259, 236888, 106] + [X] * 13 + [236812, 106] + [X] * 1,
    ("gemma", "two", "last_assistant"): [X] * 26 + [236812, 106] + [X] * 1,
    ("gemma", "two", "all"): [X] * 1 + [105, 2364, 107, 10979, 106, 107, 105, 4368, 107, 9259, 236888, 106, 107, 105, 2364, 107, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107, 236812, 106, 107],
    ("gemma", "four"): [2, 105, 2364, 107, 3912, 8652, 236761, 108, 10979, 106, 107, 105, 4368, 107, 17531, 236761, 106, 107, 105, 2364, 107, 1567, 236881, 106, 107, 105, 4368, 107, 28461, 236761, 106, 107, 105, 2364, 107, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107, 236812, 106, 107, 105, 2364, 107, 98874, 106, 107, 105, 4368, 107, 98874, 236888, 106, 107],
    ("gemma", "four", "assistant"): [X] * 14 + [17531, 236761, 106] + [X] * 27 + [236812, 106] + [X] * 10 + [98874, 236888, 106] + [X] * 1,
    ("gemma", "four", "last_assistant"): [X] * 56 + [98874, 236888, 106] + [X] * 1,
    ("gemma", "four", "all"): [X] * 1 + [105, 2364, 107, 3912, 8652, 236761, 108, 10979, 106, 107, 105, 4368, 107, 17531, 236761, 106, 107, 105, 2364, 107, 1567, 236881, 106, 107, 105, 4368, 107] + [X] * 2 + [106, 107, 105, 2364, 107, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107, 236812, 106, 107, 105, 2364, 107, 98874, 106, 107, 105, 4368, 107, 98874, 236888, 106, 107],
}


def _tok(request, name):
    return request.getfixturevalue("smol_tok" if name == "smol" else "gemma_tok")


def _apply_ids(tok, messages, source, **kw):
    out = tok.apply_chat_template([m.to_template() for m in messages], chat_template=source, tokenize=True, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("conv", ["one", "two", "four"])
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_golden_ids_and_labels(request, name, conv):
    tok = _tok(request, name)
    source = resolve_template("auto" if name == "smol" else "gemma", tok)
    for train_on in TRAIN_ON:
        ex = encode(Conversation(CONVS[conv]), tok, source, train_on)
        assert ex.input_ids == GOLDEN[(name, conv)], train_on
        assert ex.labels == GOLDEN[(name, conv, train_on)], train_on
        # the same ids as transformers, with exactly one BOS
        assert ex.input_ids == _apply_ids(tok, CONVS[conv], source)
    if name == "gemma":
        assert GOLDEN[(name, conv)].count(tok.bos_token_id) == 1


def _trained_runs(ex: Example) -> list[list[int]]:
    runs: list[list[int]] = [[]]
    for lab in ex.labels:
        if lab == IGNORE:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(lab)
    return [r for r in runs if r]


@pytest.mark.parametrize("conv", ["one", "two", "four"])
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_trained_tokens_decode_to_assistant_texts_plus_end_of_turn(request, name, conv):
    tok = _tok(request, name)
    source = resolve_template("auto" if name == "smol" else "gemma", tok)
    eot = "<|im_end|>" if name == "smol" else "<end_of_turn>"
    msgs = CONVS[conv]
    want = [m.content if name == "smol" else m.content.strip() for m in msgs if m.role == "assistant" and m.train is not False]
    ex = encode(Conversation(msgs), tok, source, "assistant")
    assert [tok.decode(r) for r in _trained_runs(ex)] == [w + eot for w in want]
    last = encode(Conversation(msgs), tok, source, "last_assistant")
    assert [tok.decode(r) for r in _trained_runs(last)] == [want[-1] + eot]


def test_pad_equals_eos_is_not_masked(smol_tok):
    # SmolLM2: pad == eos == <|im_end|>; the end-of-turn token must be trained anyway
    assert smol_tok.pad_token_id == smol_tok.eos_token_id == 2
    ex = encode(Conversation(CONVS["one"]), smol_tok, resolve_template("auto", smol_tok), "assistant")
    assert ex.labels[-2] == 2 and ex.input_ids[-2] == 2
    assert [i for i, lab in enumerate(ex.labels) if lab == 2] == [len(ex) - 2]  # only the assistant's


def test_builtin_chatml_is_smollm2_without_default_system(smol_tok):
    msgs = [M("system", "Be brief."), *CONVS["two"]]
    own = resolve_template("auto", smol_tok)
    ours = resolve_template("chatml", smol_tok)
    assert encode(Conversation(msgs), smol_tok, ours, "assistant") == encode(Conversation(msgs), smol_tok, own, "assistant")
    text = smol_tok.apply_chat_template([m.to_template() for m in CONVS["one"]], chat_template=ours, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert prompt_ids(CONVS["one"][:1], smol_tok, ours) == smol_tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def test_gemma_and_llama3_render_like_the_originals(gemma_tok):
    msgs = [m.to_template() for m in [M("system", "Sys"), *CONVS["one"]]]
    gemma = gemma_tok.apply_chat_template(msgs, chat_template=resolve_template("gemma", gemma_tok), tokenize=False, add_generation_prompt=False)
    assert gemma == "<bos><start_of_turn>user\nSys\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    llama = gemma_tok.apply_chat_template(msgs[1:], chat_template=resolve_template("llama3", gemma_tok), tokenize=False, add_generation_prompt=True)
    assert llama == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_stop_token_ids(smol_tok, gemma_tok):
    assert stop_token_ids(smol_tok, resolve_template("auto", smol_tok)) == [2]
    assert stop_token_ids(gemma_tok, resolve_template("gemma", gemma_tok)) == [106, 1]  # <end_of_turn>, <eos>


def test_prompt_ids_end_with_generation_prompt(gemma_tok):
    ids = prompt_ids(CONVS["one"][:1], gemma_tok, resolve_template("gemma", gemma_tok))
    assert ids == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]
    assert GOLDEN[("gemma", "one")][: len(ids)] == ids  # what the model sees before its reply


def test_resolve_template_errors(gemma_tok, tmp_path):
    with pytest.raises(SftError, match=r"data.template: 'auto'.*chatml\|gemma\|llama3"):
        resolve_template("auto", gemma_tok)  # a base model has no chat template
    with pytest.raises(SftError, match="did you mean 'chatml'"):
        resolve_template("chatlm", gemma_tok)
    with pytest.raises(SftError, match="is not a file"):
        resolve_template("missing.jinja", gemma_tok, base_dir=str(tmp_path))


# A template unlike any built-in: trims content, puts a prefix before it, ends turns with eos_token,
# and renders tool calls after the content.
TRIMMING = (
    "{% for m in messages %}{{ '### ' + m['role'] | upper + ':\n' + m['content'] | trim }}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}{{ ' CALL ' + c['name'] }}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### ASSISTANT:\n' }}{% endif %}"
)


def test_user_template_file_that_trims(smol_tok, tmp_path):
    (tmp_path / "mine.jinja").write_text(TRIMMING)
    source = resolve_template("mine.jinja", smol_tok, base_dir=str(tmp_path))
    msgs = [M("user", "  Hi  "), M("assistant", "  Hello there  "), M("user", "x"), M("assistant", "\nok\n")]
    ex = encode(Conversation(msgs, source="t.jsonl", line=3), smol_tok, source, "assistant")
    assert ex.input_ids == _apply_ids(smol_tok, msgs, source)
    assert (ex.source, ex.line) == ("t.jsonl", 3)
    assert [smol_tok.decode(r) for r in _trained_runs(ex)] == ["Hello there<|im_end|>", "ok<|im_end|>"]
    assert stop_token_ids(smol_tok, source) == [2]
    assert lint(smol_tok, source, [ex]) == []


def test_tool_calls_after_content_are_trained(smol_tok):
    msgs = [M("user", "Weather?"), M("assistant", "", tool_calls=[{"name": "get_weather"}]), M("tool", "sunny"), M("assistant", "Sunny.")]
    ex = encode(Conversation(msgs), smol_tok, TRIMMING, "assistant")
    assert ex.input_ids == _apply_ids(smol_tok, msgs, TRIMMING)
    assert [smol_tok.decode(r) for r in _trained_runs(ex)] == [" CALL get_weather<|im_end|>", "Sunny.<|im_end|>"]


def test_builtin_templates_accept_tools(smol_tok, gemma_tok):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]
    msgs = [M("user", "1+?"), M("assistant", "", tool_calls=call), M("tool", "2"), M("assistant", "2")]
    for tok, name in [(smol_tok, "chatml"), (gemma_tok, "gemma"), (gemma_tok, "llama3")]:
        source = resolve_template(name, tok)
        ex = encode(Conversation(msgs, tools=tools), tok, source, "assistant")
        same = ex.input_ids == _apply_ids(tok, msgs, source, tools=tools)
        assert same or (ex.meta["merged_starts"] and tok.decode(ex.input_ids) == tok.decode(_apply_ids(tok, msgs, source, tools=tools)))
        if name != "llama3":  # Gemma's vocabulary has no <|eot_id|>, so llama3 turns have no special end
            assert '"add"' in tok.decode([lab for lab in ex.labels if lab != IGNORE])  # the call is trained


def test_template_that_rewrites_content(smol_tok):
    upper = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    ex = encode(Conversation(CONVS["two"]), smol_tok, upper, "assistant")
    assert ex.input_ids == _apply_ids(smol_tok, CONVS["two"], upper)
    assert [smol_tok.decode(r) for r in _trained_runs(ex)] == ["HELLO!<|im_end|>", "4<|im_end|>"]


def test_text_rows_train_every_token(smol_tok, gemma_tok):
    conv = Conversation([M("user", "Plain text.")], is_text=True)
    ex = encode(conv, gemma_tok, "unused", "assistant")
    assert ex.input_ids == [2, *gemma_tok("Plain text.", add_special_tokens=False)["input_ids"], 1]  # <bos> ... <eos>
    assert ex.labels == [X, *ex.input_ids[1:]]
    ex = encode(conv, smol_tok, "unused", "assistant")  # SmolLM2 adds no BOS
    assert ex.input_ids == [*smol_tok("Plain text.")["input_ids"], 2]


def test_lint(smol_tok, gemma_tok):
    chatml = resolve_template("chatml", gemma_tok)  # Gemma has no <|im_end|> token
    assert any("'<|im_end|>' is not a special token of this tokenizer" in w for w in lint(gemma_tok, chatml))
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert any("no end-of-turn marker" in w for w in lint(gemma_tok, no_end))
    doubled = "{{ bos_token }}" + resolve_template("gemma", gemma_tok)
    assert any("two BOS" in w for w in lint(gemma_tok, doubled))
    not_prefix = "{{ messages | length }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    assert any("not prefix-preserving" in w for w in lint(gemma_tok, not_prefix))
    source = resolve_template("gemma", gemma_tok)
    assert lint(gemma_tok, source) == []
    silent = [M("user", "Hi"), M("assistant", "x", train=False)]
    rows = [encode(Conversation(silent, source="d.jsonl", line=7), gemma_tok, source, "assistant")]
    rows.append(Example([2, 5, 6], [X, 5, 6], source="d.jsonl", line=8))
    assert lint(gemma_tok, source, rows) == [
        "1 rows have zero trained tokens (check data.train_on and per-message train: false): d.jsonl:7",
        "1 rows never train an end-of-turn marker, so the model will not learn to stop: d.jsonl:8",
    ]


def test_bad_train_on_and_template_errors(smol_tok, gemma_tok):
    with pytest.raises(SftError, match=r"data\.train_on"):
        encode(Conversation(CONVS["one"]), smol_tok, "chatml", "everything")
    bad = Conversation([M("user", "a"), M("user", "b")], source="x.jsonl", line=2)
    with pytest.raises(SftError, match=r"x.jsonl:2: the chat template failed.*alternate"):
        encode(bad, gemma_tok, "gemma", "assistant")


def _render_work(tok, source, turns: int, monkeypatch) -> tuple[int, int, int]:
    """(template renders, characters rendered, tokenizer calls) to encode a conversation of
    ``turns`` user/assistant pairs: a count of work that, unlike wall-clock time, does not depend on
    what else the machine is running."""
    import sft.data.chat as chat_mod
    import sft.data.masks as masks_mod
    import sft.data.spans as spans_mod

    calls = {"render": 0, "chars": 0, "tokenize": 0}
    real_render, real_tokenize = masks_mod.render, chat_mod.tokenize_many

    def render(*args, **kwargs):
        out = real_render(*args, **kwargs)
        calls["render"] += 1
        calls["chars"] += len(out)
        return out

    def tokenize(tok, texts):  # one batch call; counted per text it tokenizes
        calls["tokenize"] += len(texts)
        return real_tokenize(tok, texts)

    msgs = [M("user" if i % 2 == 0 else "assistant", f"Message number {i} with some words.") for i in range(2 * turns)]
    encode(Conversation(msgs), tok, source, "assistant")  # warm-up: template compilation, probes (cached)
    with monkeypatch.context() as mp:
        mp.setattr(masks_mod, "render", render)
        mp.setattr(chat_mod, "render", render)
        mp.setattr(spans_mod, "render", render)
        mp.setattr(chat_mod, "tokenize_many", tokenize)
        encode(Conversation(msgs), tok, source, "assistant")
    return calls["render"], calls["chars"], calls["tokenize"]


def test_linear_time(smol_tok, monkeypatch):
    """Encoding renders the conversation a fixed number of times and tokenizes it once, whatever
    its length, so the work per turn is flat: linear time. Control: the exact per-turn method
    (forced by vouching for no template) renders twice per trained turn, so its characters per turn
    grow with the length: the check can fail."""
    import sft.data.spans as spans_mod

    source = resolve_template("chatml", smol_tok)
    r20, c20, t20 = _render_work(smol_tok, source, 20, monkeypatch)
    r200, c200, t200 = _render_work(smol_tok, source, 200, monkeypatch)
    assert r200 == r20 and t200 == t20 == 1
    assert c200 / 200 < 1.2 * c20 / 20, (c20, c200)  # characters rendered per turn stay flat

    monkeypatch.setattr(spans_mod, "regular", lambda tok, src: False)  # control: the quadratic path
    q20, qc20, _ = _render_work(smol_tok, source, 20, monkeypatch)
    q200, qc200, _ = _render_work(smol_tok, source, 200, monkeypatch)
    assert q200 > 5 * q20 and qc200 / 200 > 5 * qc20 / 20


def test_template_errors_name_file_and_line_once(smol_tok):
    from sft.config import Config
    from sft.data.pipeline import DataReport, tokenize_conversations

    bad = Conversation([M("user", "a"), M("assistant", "b")], source="x.jsonl", line=4)
    report = DataReport()
    failing = "{{ raise_exception('no thanks') }}"
    assert tokenize_conversations([bad], smol_tok, failing, Config(), report) == []
    assert report.problems() == [
        "x.jsonl:4: the chat template failed on this conversation: no thanks; fix the row or choose another data.template"]
