"""The bulk path (compiled template, one rendering per conversation against cached fragments of its
shape, one batched tokenizer call per chunk, masks as arrays) gives exactly the examples of the
exact per-turn method with ``apply_chat_template`` and one tokenizer call per text, on every shipped
template; each shortcut has a control that shows the comparison can fail.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from sft.data import chat, render, spans
from sft.data.chat import encode_all, resolve_template
from sft.data.masks import labels_for, tokenize
from sft.data.source_cache import Encoding, encode_chunk
from sft.data.types import IGNORE, Conversation
from sft.data.types import Message as M
from sft.errors import SftError

TEMPLATES = Path(__file__).parent / "templates"
SHIPPED = [("builtin", n) for n in ("chatml", "gemma", "llama3")] + [("file", p.name) for p in sorted(TEMPLATES.glob("*.jinja"))]

PLAIN = [
    [M("user", "Hi"), M("assistant", "Hello!")],
    [M("system", "Be brief."), M("user", "Hi"), M("assistant", "Hello!"), M("user", "2+2?"), M("assistant", "4")],
    [M("user", "  padded  "), M("assistant", "\nStarts with a newline "), M("user", "again"), M("assistant", "  both  \n")],
    [M("user", "¿Qué tal? 你好 👋"), M("assistant", "Très bien — 谢谢! 🎉")],
    [M("user", "Q"), M("assistant", "A <|im_end|> inside"), M("user", "Q2"), M("assistant", "")],
]


def _source(kind: str, name: str, tok) -> str:
    return resolve_template(name, tok) if kind == "builtin" else (TEMPLATES / name).read_text("utf-8")


def _tok(name: str, smol_tok, gemma_tok):
    return gemma_tok if "gemma" in name else smol_tok


@pytest.mark.parametrize(("kind", "name"), SHIPPED)
def test_compiled_renderer_renders_like_apply_chat_template(kind, name, smol_tok, gemma_tok):
    tok = _tok(name, smol_tok, gemma_tok)
    source = _source(kind, name, tok)
    fast = render.compiled(tok, source)
    if fast is None:  # a template that refuses a probe renders the ordinary way: nothing to compare
        pytest.skip(f"{name}: not vouched for")
    for conv in PLAIN:
        msgs = [m.to_template() for m in conv]
        for gen, view in ((False, msgs), (True, msgs[:-1])):
            try:
                want = tok.apply_chat_template(view, chat_template=source, add_generation_prompt=gen, tokenize=False)
            except Exception:  # the template refuses the conversation (magistral: an empty reply): so does fast
                with pytest.raises(Exception):  # noqa: B017
                    fast(view, gen)
                continue
            assert fast(view, gen) == want


def test_compiled_renderer_is_refused_when_a_probe_differs(smol_tok, gemma_tok):
    """Control: the probe comparison has teeth. A tokenizer whose apply_chat_template renders
    anything else than the compiled template is not vouched for, and gemma's template without its
    special tokens (bos_token) renders differently from apply_chat_template."""
    source = resolve_template("gemma", gemma_tok)

    class Other:
        special_tokens_map = gemma_tok.special_tokens_map

        def apply_chat_template(self, *a, **k):
            return "something else"

    assert render.compiled(Other(), source) is None
    assert render.compiled(gemma_tok, source) is not None
    from transformers.utils.chat_template_utils import _compile_jinja_template

    msgs = [{"role": "user", "content": "Hi"}]
    bare = _compile_jinja_template(source).render(messages=msgs, add_generation_prompt=False)
    assert bare != gemma_tok.apply_chat_template(msgs, chat_template=source, tokenize=False)


def _exact(monkeypatch):
    """The reference: no compiled renderer, no content-span regions (two apply_chat_template
    renderings per trained turn), and one tokenizer call per text with labels_for's sweep."""
    monkeypatch.setattr(render, "compiled", lambda tok, src: None)
    monkeypatch.setattr(chat, "turn_regions", lambda *a, **k: None)


def _reference(conv: Conversation, tok, source: str, train_on: str = "assistant") -> list[tuple[list[int], list[int]]]:
    out = []
    for text, regions, _, untrained in chat.plan_all(conv, tok, source, train_on):
        ids, offsets = tokenize(tok, text)
        cuts = [s for s, _ in regions if any(a < s < b for a, b in offsets)]
        if cuts and not untrained:
            from sft.data.masks import tokenize_apart

            ids, offsets = tokenize_apart(tok, text, cuts)
        labels = labels_for(ids, offsets, regions, IGNORE)
        if untrained:
            labels = [IGNORE if m != IGNORE else t for t, m in zip(ids, labels)]
        out.append((ids, [IGNORE, *labels[1:]]))
    return out


@pytest.mark.parametrize(("kind", "name"), SHIPPED)
def test_bulk_chunk_equals_the_exact_method(kind, name, smol_tok, gemma_tok, monkeypatch):
    """Every plain conversation of PLAIN, twice (the second time from the shape cache), encoded as
    one chunk, equals the exact method's examples token for token."""
    tok = _tok(name, smol_tok, gemma_tok)
    source = _source(kind, name, tok)
    convs = [Conversation(copy.deepcopy(c), source="x.jsonl", line=i) for i, c in enumerate(PLAIN * 2)]
    out = encode_chunk(convs, Encoding(tok, source, "assistant", "keep_last", 4096, "truncate"))
    want, bad = [], []
    with monkeypatch.context() as mp:
        _exact(mp)
        for r, c in enumerate(convs):
            try:
                want += _reference(c, tok, source)
            except SftError:  # magistral refuses an empty reply: the chunk names the same rows
                bad.append(r)
    assert [r for r, _ in out["errors"]] == bad and len(out["lengths"]) == len(want) > 0
    at = np.concatenate([[0], np.cumsum(out["lengths"])])
    for k, (ids, labels) in enumerate(want):
        got = out["input_ids"][at[k] : at[k + 1]]
        assert got.tolist() == ids
        assert np.where(out["trained"][at[k] : at[k + 1]] != 0, got, IGNORE).tolist() == labels


def test_shape_cache_falls_back_where_content_changes_the_template(smol_tok, monkeypatch):
    """A template that writes "[!]" before contents starting with "!" renders probes and the
    cached shape alike, so only the per-conversation walk can notice: the reply is then found by
    the exact method, "[!]" trained with it. Control: the shape's fragments, taken for granted,
    would leave "[!]" out."""
    source = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content.startswith('!') %}[!]{% endif %}"
              "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert spans.regular(smol_tok, source)
    plain = Conversation([M("user", "Hi"), M("assistant", "Hello")])
    odd = Conversation([M("user", "Hi"), M("assistant", "!Hello")])
    encode_all(plain, smol_tok, source, "assistant")  # caches the shape
    (ex,) = encode_all(odd, smol_tok, source, "assistant")
    trained = smol_tok.decode([t for t in ex.labels if t != IGNORE])
    assert trained == "[!]!Hello<|im_end|>"
    with monkeypatch.context() as mp:
        _exact(mp)
        assert [(ex.input_ids, ex.labels)] == _reference(odd, smol_tok, source)
    rendered = smol_tok.apply_chat_template([m.to_template() for m in odd.messages], chat_template=source, tokenize=False)
    start = rendered.index("!Hello")  # what a walk that skipped the check would take as the reply
    assert rendered[start:].startswith("!Hello") and "[!]" in rendered[:start]


def test_bulk_masks_have_teeth(smol_tok):
    """Control: the array mask equals labels_for's sweep, and an off-by-one region does not."""
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there<|im_end|>\n"
    ((ids, offsets),) = render.tokenize_many(smol_tok, [text])
    assert ids.tolist() == tokenize(smol_tok, text)[0]
    region = [(text.index("Hello"), text.rindex("<|im_end|>") + len("<|im_end|>"))]
    want = [lab != IGNORE for lab in labels_for(ids.tolist(), offsets.tolist(), region, IGNORE)]
    assert render.trained_tokens(offsets, region).tolist() == want and sum(want) == 3
    shifted = [(region[0][0] - 1, region[0][1])]  # one char into the header: one more token trained
    assert render.trained_tokens(offsets, shifted).tolist() != want
