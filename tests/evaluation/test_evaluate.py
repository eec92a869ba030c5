"""Metrics (each with a passing and a failing case), held-out loss, forgetting, evaluate()."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_llama
from sft.config import load_config
from sft.errors import SftError
from sft.evaluation.evaluate import evaluate, forgetting, score, split_reference, summary
from sft.evaluation.generate import Generation
from sft.evaluation.reference import reference_text


@pytest.mark.parametrize(
    ("reply", "reference", "metric", "ok"),
    [
        (" 42\n", "42", "exact", True),
        ("42.", "42", "exact", False),
        ("My name is QUILL, hi.", "my name is quill", "contains", True),
        ("My name is Quin.", "my name is quill", "contains", False),
        ("  42 ", r"^\s*42\s*$", "regex", True),
        ("142", r"^\s*42\s*$", "regex", False),
        ('{"name": "Maria", "city": "Lisbon", "extra": 1}', '{"name": "Maria", "city": "Lisbon"}', "json", True),
        ('```json\n{"answer": 8}\n```', '{"answer": 8}', "json", True),
        ('{"name": "Maria", "city": "Porto"}', '{"name": "Maria", "city": "Lisbon"}', "json", False),
        ('{"name": "Maria"}', '{"name": "Maria", "city": "Lisbon"}', "json", False),
        ('{"answer": "8"}', '{"answer": 8}', "json", False),
        ("The answer is {\"answer\": 8}", '{"answer": 8}', "json", False),
        ("[1, 2]", '{"answer": 8}', "json", False),
    ],
)
def test_score(reply, reference, metric, ok):
    assert score(reply, reference, metric) is ok


def test_score_errors():
    with pytest.raises(SftError, match="not a valid regex"):
        score("x", "(", "regex")
    with pytest.raises(SftError, match="not a JSON object"):
        score("{}", "[1]", "json")
    with pytest.raises(SftError, match="use one of exact, contains, regex, json"):
        score("x", "x", "fuzzy")


def test_split_reference_takes_last_assistant():
    from sft.data.types import Conversation, Message

    c = Conversation([Message("system", "s"), Message("user", "a"), Message("assistant", "b"),
                      Message("user", "c"), Message("assistant", "d")])
    msgs, ref = split_reference(c)
    assert [m.content for m in msgs] == ["s", "a", "b", "c"] and ref == "d"
    assert split_reference(Conversation([Message("user", "a")])) is None


@pytest.fixture(scope="module")
def m(smol_tok):
    return tiny_llama(len(smol_tok), seed=0)


def test_forgetting_kl_zero_to_itself_and_positive_to_other(smol_tok, m):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    same = forgetting(m, smol_tok, text, base_model=m)
    assert same["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(same["reference_perplexity"]) and same["reference_perplexity"] > 1
    other = forgetting(m, smol_tok, text, base_model=tiny_llama(len(smol_tok), seed=1))  # the control
    assert other["kl_to_base"] > 1e-3
    assert other["reference_perplexity"] == pytest.approx(same["reference_perplexity"], rel=1e-5)
    assert "kl_to_base" not in forgetting(m, smol_tok, text)


def test_reference_text_default_and_file(tmp_path):
    text = reference_text(None)
    assert len(text) > 8000 and text == reference_text(None)
    assert ">>>" not in text
    f = tmp_path / "ref.txt"
    f.write_text("Plain words for testing.")
    assert reference_text(str(f)) == "Plain words for testing."
    with pytest.raises(SftError, match="not found"):
        reference_text(str(tmp_path / "missing.txt"))


EVAL_ROWS = [
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]},
    {"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "My name is Quill."}]},
    {"messages": [{"role": "user", "content": "I live in Oslo."}, {"role": "assistant", "content": "Noted."},
                  {"role": "user", "content": "Where do I live?"}, {"role": "assistant", "content": "You live in Oslo."}]},
]


def _cfg(tmp_path, metric_override: str | None = None):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    (tmp_path / "exact.jsonl").write_text(json.dumps(EVAL_ROWS[0]) + "\n")
    src = [{"path": "eval.jsonl"}]
    if metric_override:
        src.append({"path": "exact.jsonl", "metric": metric_override})
    (tmp_path / "ref.txt").write_text("General English text to measure forgetting on, kept short for speed. " * 8)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({
        "model": "smollm2-135m-instruct", "output_dir": str(tmp_path / "run"),
        "data": {"template": "chatml", "cache_dir": str(tmp_path / "cache")},
        "eval": {"data": src, "metric": "contains", "max_new_tokens": 4, "samples": 2, "batch_size": 2,
                 "reference": str(tmp_path / "ref.txt")},
    }))
    return load_config(cfg_file)


def test_evaluate_tiny_model_is_deterministic(tmp_path, smol_tok, m):
    cfg = _cfg(tmp_path)
    m.train()
    a = evaluate(cfg, m, smol_tok, "chatml", base_model=m, progress=False)
    assert m.training  # restored
    b = evaluate(cfg, m, smol_tok, "chatml", progress=False)
    for k in ("eval_loss", "perplexity", "task_accuracy", "stop_rate", "mean_response_tokens", "samples"):
        assert a[k] == b[k], k
    assert a["n_examples"] == 3 and len(a["samples"]) == 2
    assert a["perplexity"] == pytest.approx(math.exp(a["eval_loss"]))
    assert a["eval_loss"] > 5  # a random model over a 49k vocabulary: about ln(49152) = 10.8
    assert a["forgetting"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert set(a["samples"][0]) == {"prompt", "reference", "reply", "correct", "stopped"}
    assert a["samples"][0]["reference"] == "2 + 3 = 5."
    json.dumps(a)  # JSON-able
    assert "task accuracy" in summary(a)


def test_evaluate_scores_replies_with_source_metric(tmp_path, smol_tok, monkeypatch, m):
    """Replies are stubbed: the first eval row gets a correct-but-verbose reply. `contains`
    accepts it; the same row from a source with `metric: exact` must reject it."""
    cfg = _cfg(tmp_path, metric_override="exact")
    replies = {"2 + 3 = 5.": "Sure! 2 + 3 = 5.", "My name is Quill.": "I am Bob.", "You live in Oslo.": "You live in Oslo."}
    seen_prompts = []

    def fake_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=8, progress=False):
        seen_prompts.extend(prompts)
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            ref = next(r for q, r in [("2 + 3", "2 + 3 = 5."), ("Name?", "My name is Quill."),
                                      ("Where do I live", "You live in Oslo.")] if q in text)
            out.append(Generation(text=replies[ref], token_ids=[1, 2, 3], stopped=True))
        return out

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    r = evaluate(cfg, m, smol_tok, "chatml", progress=False)
    assert r["n_examples"] == 4
    assert r["task_accuracy"] == pytest.approx(2 / 4)  # contains: yes, no, yes; exact: no
    assert r["accuracy_by_source"] == {"eval.jsonl": pytest.approx(2 / 3), "exact.jsonl": 0.0}
    assert r["stop_rate"] == 1.0 and r["mean_response_tokens"] == 3.0
    # the prompt ends with the generation prompt and holds the earlier turns, not the reference
    multi = smol_tok.decode(seen_prompts[2] if "Oslo" in smol_tok.decode(seen_prompts[2]) else seen_prompts[0])
    assert multi.endswith("<|im_start|>assistant\n")
    assert "You live in Oslo." not in multi
