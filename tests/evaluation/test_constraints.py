"""Verifiable constraints: each checker, the spec errors, the shipped set, and evaluate() with them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import tiny_llama
from sft.config import load_config
from sft.errors import SftError
from sft.evaluation.constraints import CHECKS, check, check_rows, spec_problem
from sft.evaluation.generate import Generation

SET = Path(__file__).resolve().parents[2] / "examples" / "constraints"

# (constraint, a reply that meets it, a reply that does not): every checker must tell them apart
CASES = [
    ({"type": "max_words", "n": 5}, "Tea is a mild drink.", "Tea is a mild and calming drink."),
    ({"type": "min_words", "n": 5}, "Tea is a mild drink.", "Tea is mild."),
    ({"type": "max_chars", "n": 10}, "Short one.", "Not a short one."),
    ({"type": "num_bullets", "n": 2}, "Two:\n- green\n- black", "- green\n- black\n- white"),
    ({"type": "num_paragraphs", "n": 2}, "One.\n\nTwo.", "One.\nStill one."),
    ({"type": "json_keys", "keys": ["a", "b"]}, '```json\n{"a": 1, "b": 2}\n```', '{"a": 1}'),
    ({"type": "must_include", "text": ["tea", "leaf"]}, "A TEA LEAF.", "A tea bag."),
    ({"type": "must_not_include", "text": "coffee"}, "Tea.", "Tea or Coffee."),
    ({"type": "starts_with", "text": "Yes"}, "yes, it is.", "Well, yes."),
    ({"type": "ends_with", "text": "done"}, "All of it. Done\n", "Done. Not all."),
    ({"type": "lowercase"}, "all lower, 42.", "Not all lower."),
    ({"type": "uppercase"}, "ALL UPPER, 42.", "ALL UPPEr."),
    ({"type": "no_commas"}, "No commas here.", "One, two."),
    ({"type": "one_line"}, "Just one line.", "Line one.\nLine two."),
]


@pytest.mark.parametrize(("spec", "good", "bad"), CASES, ids=[c[0]["type"] for c in CASES])
def test_each_checker_tells_good_from_bad(spec, good, bad):
    assert spec_problem(spec) is None
    assert check(good, [spec]) == [True]
    assert check(bad, [spec]) == [False]


def test_every_type_has_a_case():
    assert {c[0]["type"] for c in CASES} == set(CHECKS)


def test_bad_specs_name_row_and_fix():
    with pytest.raises(SftError) as e:
        check_rows([("eval.jsonl:3", [{"type": "max_word", "n": 3}]), ("eval.jsonl:4", [{"type": "num_bullets"}]),
                    ("eval.jsonl:5", []), ("eval.jsonl:6", [{"type": "lowercase", "n": 1}])])
    msg = str(e.value)
    assert "eval.jsonl:3: constraints[0]: type 'max_word' is unknown; did you mean 'max_words'?" in msg
    assert "eval.jsonl:4: constraints[0]: num_bullets needs n (a whole number)" in msg
    assert "eval.jsonl:5: constraints is []" in msg
    assert "eval.jsonl:6: constraints[0]: lowercase takes no n; remove it" in msg
    assert spec_problem({"type": "max_words", "n": True}) is not None  # a bool is not a count
    assert spec_problem({"type": "max_words", "n": -1}) is not None


@pytest.fixture(scope="module")
def shipped():
    spec = importlib.util.spec_from_file_location("constraints_make_data", SET / "make_data.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_set_is_regenerated_and_its_references_meet_their_constraints(shipped, tmp_path):
    out = shipped.main(tmp_path)
    assert out.read_bytes() == (SET / "constraints_v1.jsonl").read_bytes(), "re-run make_data.py"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 100 and len({r["messages"][0]["content"] for r in rows}) == 100
    check_rows([(f"constraints_v1.jsonl:{i + 1}", r["constraints"]) for i, r in enumerate(rows)])
    types = [c["type"] for r in rows for c in r["constraints"]]
    assert all(types.count(t) >= 10 for t in CHECKS if t != "max_chars"), types
    for r in rows:
        assert all(check(r["messages"][-1]["content"], r["constraints"])), r
    # control: another row's reply breaks some constraint of nearly every row
    broken = sum(not all(check(rows[(i + 1) % 100]["messages"][-1]["content"], r["constraints"]))
                 for i, r in enumerate(rows))
    assert broken >= 95


# ---------------------------------------------------------------------------------------------
# evaluate() with constraints, replies stubbed

ROWS = [
    {"messages": [{"role": "user", "content": "Two bullets about tea."}, {"role": "assistant", "content": "- a\n- b"}],
     "constraints": [{"type": "num_bullets", "n": 2}, {"type": "must_include", "text": "tea"}]},
    {"messages": [{"role": "user", "content": "Say hi in lowercase."}, {"role": "assistant", "content": "hi"}],
     "constraints": [{"type": "lowercase"}]},
    {"messages": [{"role": "user", "content": "JSON with key a."}, {"role": "assistant", "content": '{"a": 1}'}],
     "constraints": [{"type": "json_keys", "keys": ["a"]}, {"type": "max_words", "n": 3}]},
]
REPLIES = {"bullets": "- tea\n- more tea", "lowercase": "Hi!", "JSON": '{"a": 1, "b": "two words"}'}


def _cfg(tmp_path, rows, metric="constraints"):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ref.txt").write_text("General English text to measure forgetting on, kept short. " * 4)
    (tmp_path / "c.yaml").write_text(json.dumps({
        "model": "smollm2-135m-instruct", "output_dir": str(tmp_path / "run"),
        "data": {"template": "chatml", "cache_dir": str(tmp_path / "cache")}, "train": {"precision": "fp32"},
        "eval": {"data": [{"path": "eval.jsonl"}], "metric": metric, "max_new_tokens": 4, "batch_size": 4,
                 "reference": str(tmp_path / "ref.txt")},
    }))
    return load_config(tmp_path / "c.yaml")


@pytest.fixture()
def stub(monkeypatch):
    def fake_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=8, progress=False, rt=None):
        texts = [tokenizer.decode(p) for p in prompts]
        return [Generation(text=next(v for k, v in REPLIES.items() if k in t), token_ids=[1], stopped=True, stop_id=2)
                for t in texts]

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)


@pytest.fixture(scope="module")
def m(smol_tok):
    return tiny_llama(len(smol_tok), seed=0)


def test_evaluate_scores_constraints(tmp_path, smol_tok, m, stub):
    from sft.evaluation.evaluate import evaluate, summary

    r = evaluate(_cfg(tmp_path, ROWS), m, smol_tok, "chatml", progress=False)
    # row 1 meets both, row 2 fails lowercase, row 3 meets json_keys but has 5 words > 3
    assert r["task_accuracy"] == pytest.approx(1 / 3) and r["constraint_rows_met"] == pytest.approx(1 / 3)
    assert r["constraint_share_met"] == pytest.approx(3 / 5)
    assert r["constraints_by_type"] == {"json_keys": 1.0, "lowercase": 0.0, "max_words": 0.0, "must_include": 1.0,
                                        "num_bullets": 1.0}
    assert r["rows"]["constraint_rows_met"] == "100" and r["rows"]["constraints_met"] == [2, 0, 1]
    assert r["n"]["constraint_rows_met"] == 3 and r["n"]["constraint_share_met"] == 5
    assert r["intervals"]["constraint_rows_met"] == pytest.approx([0.061492, 0.792341], abs=1e-6)  # Wilson 1/3
    assert "constraints      33.3% [6.1, 79.2]% of rows met all, n=3 rows; 60.0%" in summary(r)
    # control: the same rows under `contains` score against the references, and still report constraints
    c = evaluate(_cfg(tmp_path, ROWS, metric="contains"), m, smol_tok, "chatml", progress=False)
    assert c["rows"]["correct"] == "010" and r["rows"]["correct"] == "100"  # only "hi" is in its reply
    assert c["constraint_rows_met"] == r["constraint_rows_met"]


def test_constraints_metric_without_lists_is_an_error(tmp_path, smol_tok, m, stub):
    from sft.evaluation.evaluate import evaluate

    rows = [ROWS[0], {"messages": ROWS[1]["messages"]}]
    with pytest.raises(SftError, match=r"eval.metric: constraints, but 1 row\(s\) have no constraints list "
                                       r"\(first: .*eval.jsonl:2\)"):
        evaluate(_cfg(tmp_path, rows), m, smol_tok, "chatml", progress=False)
    bad = [{**ROWS[0], "constraints": [{"type": "max_word", "n": 3}]}]
    with pytest.raises(SftError, match=r"eval.jsonl:1: constraints\[0\]: type 'max_word' is unknown"):
        evaluate(_cfg(tmp_path, bad), m, smol_tok, "chatml", progress=False)
