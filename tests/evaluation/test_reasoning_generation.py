"""Reasoning models at inference: stop on a plain-text end-of-turn marker (generate, chat, eval),
score the answer after the reasoning, report the reasoning length, show reasoning apart in chat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sft.evaluation.generate import Generation, chat, generate_batch, generate_file
from sft.evaluation.reasoning import ChatView, cut_at_text, split_answer

from .test_evaluate import _cfg
from .test_generate import NEVER, untied_llama

TEMPLATES = Path(__file__).parents[1] / "data" / "templates"
# a ChatML-like template whose assistant turns end with MARKER: plain text, not a special token
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}"
            "{% if m.role == 'assistant' %}{{ 'MARKER' }}{% else %}{{ '<|im_end|>' }}{% endif %}{{ '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def model(smol_tok):
    return untied_llama(len(smol_tok))


@pytest.fixture(scope="module")
def marked(smol_tok, model):
    """(template, marker, free reply): the marker is text the tiny model writes greedily in its 3rd
    to 5th tokens after the prompt "hi", so a generation that stops on it stops early."""
    from sft.data.chat import prompt_ids
    from sft.data.types import Message

    ids = prompt_ids([Message("user", "hi")], smol_tok, TEMPLATE.replace("MARKER", "ZZZ"))
    (free,) = generate_batch(model, smol_tok, [ids], NEVER, max_new_tokens=12)
    marker = smol_tok.decode(free.token_ids[2:5]).strip()
    assert len(marker) >= 3 and marker in free.text and "<" not in marker
    return TEMPLATE.replace("MARKER", marker), marker, free


def test_stop_strings_only_for_markers_of_several_text_tokens(smol_tok, marked):
    from sft.data.chat import end_of_turn_tokens, resolve_template, stop_strings, stop_token_ids

    template, marker, _ = marked
    assert stop_strings(smol_tok, template) == [marker]
    assert len(end_of_turn_tokens(smol_tok, template)[1]) > 1
    assert stop_token_ids(smol_tok, template) == [smol_tok.eos_token_id]  # no single stop id for it
    phi = (TEMPLATES / "phi3.5.jinja").read_text("utf-8")
    assert stop_strings(smol_tok, phi) == ["<|end|>"]  # Phi-3.5's marker without Phi's special tokens
    assert stop_strings(smol_tok, resolve_template("chatml", smol_tok)) == []  # <|im_end|>: a stop id


def test_generate_batch_stops_on_the_marker_text(smol_tok, model, marked):
    from sft.data.chat import prompt_ids
    from sft.data.types import Message

    template, marker, free = marked
    ids = prompt_ids([Message("user", "hi")], smol_tok, template)
    (got,) = generate_batch(model, smol_tok, [ids], NEVER, max_new_tokens=12, stop_strings=[marker])
    assert got.stopped and got.stop_text == marker and got.stop_id is None
    assert marker not in got.text and free.text.startswith(got.text)
    assert got.token_ids == free.token_ids[: len(got.token_ids)] and len(got.token_ids) <= 2
    assert len(free.token_ids) == 12 and not free.stopped  # control: without it, it runs to the limit


def test_generate_file_and_chat_stop_on_the_marker(smol_tok, model, marked, tmp_path, monkeypatch, capsys):
    template, marker, free = marked
    d = tmp_path / "m"
    model.save_pretrained(str(d), safe_serialization=True)
    smol_tok.save_pretrained(str(d))
    (tmp_path / "t.jinja").write_text(template)
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "o.jsonl"
    assert generate_file(str(d), str(src), str(out), max_new_tokens=12, template=str(tmp_path / "t.jinja")) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["stopped"] is True and marker not in row["response"] and free.text.startswith(row["response"])
    lines = iter(["hi"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    capsys.readouterr()
    assert chat(str(d), max_new_tokens=12, template=str(tmp_path / "t.jinja")) == 0
    shown = capsys.readouterr().out.split("bot> ", 1)[1]
    assert marker not in shown and shown.strip() == row["response"].strip()


def test_eval_scores_the_answer_after_the_reasoning(tmp_path, smol_tok, monkeypatch):
    """Replies are stubbed with reasoning before the answer; `exact` must see only the answer.
    Control: the whole reply (reasoning included) is not an exact match."""
    from conftest import tiny_llama
    from sft.evaluation.evaluate import evaluate
    from sft.evaluation.task import score

    cfg = _cfg(tmp_path)
    cfg.eval.metric = "exact"
    answers = {"2 + 3": "2 + 3 = 5.", "Name?": "My name is Quill.", "Where do I live": "You live in Paris."}
    reasoning = "<think>\nThe user asks; I recall the fact and answer briefly.\n</think>\n\n"

    def fake_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=8, progress=False, rt=None):
        out = []
        for p in prompts:
            answer = next(a for q, a in answers.items() if q in tokenizer.decode(p))
            out.append(Generation(reasoning + answer, [1, 2, 3], True, 2))
        return out

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    r = evaluate(cfg, tiny_llama(len(smol_tok)), smol_tok, "chatml", progress=False)
    assert r["task_accuracy"] == pytest.approx(2 / 3)  # Paris is wrong
    thought = len(smol_tok("The user asks; I recall the fact and answer briefly.", add_special_tokens=False)["input_ids"])
    assert r["mean_reasoning_tokens"] == pytest.approx(thought)
    from sft.evaluation.evaluate import summary

    assert f"reasoning tokens {thought:.1f} (mean; scores use the answer after it)" in summary(r)
    assert not score(reasoning + "2 + 3 = 5.", "2 + 3 = 5.", "exact")  # control: the whole reply fails


def test_eval_counts_a_plain_text_marker_as_a_stop(tmp_path, smol_tok, marked, monkeypatch):
    from conftest import tiny_llama
    from sft.evaluation.evaluate import evaluate

    template, marker, _ = marked
    seen = {}
    ends = iter([("x", True, None, marker), ("y", False, None, None), ("z", True, smol_tok.eos_token_id, None)])

    def fake_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=8, progress=False,
                      stop_strings=None, rt=None):
        seen["stop_strings"] = stop_strings
        return [Generation(t, [5], s, i, m) for (t, s, i, m), _ in zip(ends, prompts)]

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    cfg = _cfg(tmp_path)
    r = evaluate(cfg, tiny_llama(len(smol_tok)), smol_tok, template, progress=False)
    assert seen["stop_strings"] == [marker] and r["stop_token"] == marker
    assert r["stop_rate"] == pytest.approx(2 / 3)  # the marker, and EOS (the only stop id); not the run-out


@pytest.mark.parametrize(("raw", "opened", "want"), [
    ("[THINK]Odd.[/THINK]Yes.", False, ("Odd.", "Yes.")),  # Magistral
    ("Odd.</think>Yes.", True, ("Odd.", "Yes.")),  # DeepSeek-V3.1: the prompt opened <think>
    ("<think>\nstill thinking", False, ("still thinking", "")),  # ran out inside the block: no answer
    ("<|channel|>analysis<|message|>Odd.", False, ("Odd.", "")),
    ("a </think> in the middle of a plain reply", False, (None, "a </think> in the middle of a plain reply")),
])
def test_split_answer(raw, opened, want):
    assert split_answer(raw, opened) == want


def test_cut_at_text(smol_tok):
    ids = smol_tok("Sure, 4<|end|>\nmore", add_special_tokens=False)["input_ids"]
    kept, stop = cut_at_text(smol_tok, ids, ["<|end|>"])
    assert stop == "<|end|>" and smol_tok.decode(kept) == "Sure, 4"
    assert cut_at_text(smol_tok, ids, ["nowhere"]) == (ids, None)


def test_chat_view_shows_reasoning_apart_or_hides_it():
    pieces = ["<thi", "nk>\nLet me", " think.\n</th", "ink>", "\n\nIt is", " 4.MAR", "KER junk"]
    shown = io.StringIO()
    view = ChatView(["MARKER"], opened=False, hide=False, out=shown)
    for p in pieces:
        view.feed(p)
    view.close()
    assert shown.getvalue() == "\x1b[2m(thinking) Let me think.\x1b[0m\nIt is 4.\n"
    hidden = io.StringIO()
    view = ChatView(["MARKER"], opened=False, hide=True, out=hidden)
    for p in pieces:
        view.feed(p)
    view.close()
    assert hidden.getvalue() == "(thinking hidden)\nIt is 4.\n"
