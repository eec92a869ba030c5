from __future__ import annotations

import io
import json

import pytest

from sft.config import load_config
from sft.data import commands
from sft.data.pipeline import build_dataset
from sft.data.types import IGNORE


def qa(i, answer=None):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer or f"a{i}"}]}


@pytest.fixture()
def no_weights(monkeypatch, smol_tok):
    """`sft data` must never load weights; the real tokenizer is reused to keep tests fast."""
    import sft.models.load

    def boom(*a, **k):
        raise AssertionError("sft data loaded model weights")

    monkeypatch.setattr(sft.models.load, "load_model", boom)
    monkeypatch.setattr(sft.models.load, "model_dir", boom)
    monkeypatch.setattr(sft.models.load, "load_tokenizer", lambda name, trust_remote_code=False, **kw: smol_tok)


def config(tmp_path, rows, extra=""):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        f"model: smollm2-135m-instruct\ndata:\n  train: [train.jsonl]\n  cache_dir: {tmp_path / 'cache'}\n  max_length: 128\n{extra}"
        "train:\n  batch_size: 2\n  grad_accum: 2\n"
    )
    return load_config(tmp_path / "c.yaml")


def test_check_json_reports_invalid_rows_and_exits_1(tmp_path, no_weights):
    rows = [qa(0), qa(1), qa(0), {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    cfg = config(tmp_path, rows)
    out = io.StringIO()
    assert commands.check(cfg, as_json=True, stream=out) == 1
    (line,) = out.getvalue().splitlines()  # ONE JSON object
    r = json.loads(line)
    assert r["invalid"] == [{"file": str(tmp_path / "train.jsonl"), "line": 4,
                             "error": "messages[0].role is 'bot'; use one of system, user, assistant, tool"}]
    assert (r["rows"], r["valid"], r["skipped"], r["duplicates"], r["examples"]) == (4, 3, 0, 1, 3)
    assert 0 < r["trained_token_fraction"] < 1 and 0 < r["packing_efficiency"] <= 1
    assert r["packed_sequences"] == 1 and r["estimated_steps"] == 1
    assert set(r["length_percentiles"]) == {"p50", "p90", "p95", "p99", "p100"}
    assert r["lint"] == []


def test_check_skip_exits_0_and_text_report(tmp_path, no_weights):
    rows = [qa(i) for i in range(6)] + [{"messages": [{"role": "user", "content": "only"}]}, qa(9, "long " * 150)]
    cfg = config(tmp_path, rows, extra="  on_invalid: skip\n")
    out = io.StringIO()
    assert commands.check(cfg, as_json=False, stream=out) == 0
    text = out.getvalue()
    assert "rows: 8  valid: 7  invalid rows: 1  skipped: 1" in text
    assert "dropped too long: 1" in text
    assert "length histogram (tokens):" in text and "estimated optimizer steps: 1" in text
    assert "train.jsonl:7: no assistant turn" in text


def test_preview_marks_trained_tokens(tmp_path, no_weights):
    cfg = config(tmp_path, [qa(0), qa(1), qa(2)])
    out = io.StringIO()
    assert commands.preview(cfg, n=2, stream=out, color=False) == 0
    text = out.getvalue()
    assert text.startswith("legend: [[trained tokens]]")
    assert "<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\n[[a0<|im_end|>]]" in text
    assert "[[a1<|im_end|>]]" in text and "a2" not in text  # n=2
    out = io.StringIO()
    commands.preview(cfg, n=1, stream=out, color=True)
    assert "\033[1;32ma0<|im_end|>\033[0m" in out.getvalue() and "[[" not in out.getvalue()


def tool_row():
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    return {"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "tool_calls": [call]},
                         {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]}


def test_rows_the_template_cannot_render_are_invalid_not_valid(tmp_path, no_weights):
    # SmolLM2's own template writes no tool calls: the row parses, then fails to render. It is counted
    # once, as invalid (the report used to say "valid: 3  invalid rows: 1" for 3 rows).
    cfg = config(tmp_path, [qa(0), tool_row(), qa(2)], extra="  on_invalid: skip\n")
    out = io.StringIO()
    assert commands.check(cfg, as_json=True, stream=out) == 0
    r = json.loads(out.getvalue())
    assert (r["rows"], r["valid"], r["invalid_rows"], r["skipped"], r["examples"]) == (3, 2, 1, 1, 2)
    (src,) = r["sources"]
    assert (src["rows"], src["valid"], src["invalid"], src["used"]) == (3, 2, 1, 2)
    assert r["invalid"][0]["line"] == 2 and "tool calls" in r["invalid"][0]["error"]
    cfg.data.template = "chatml"  # a template with tool calls renders it
    out = io.StringIO()
    assert commands.check(cfg, as_json=True, stream=out) == 0
    r = json.loads(out.getvalue())
    assert (r["rows"], r["valid"], r["invalid_rows"], r["examples"]) == (3, 3, 0, 3)


def test_preview_shows_a_row_it_cannot_render_and_goes_on(tmp_path, no_weights):
    cfg = config(tmp_path, [tool_row(), qa(1)])
    out = io.StringIO()
    assert commands.preview(cfg, n=2, stream=out, color=False) == 0
    text = out.getvalue()
    assert f"=== {tmp_path / 'train.jsonl'}:1: not rendered, so not trained ===\nerror: messages[1] has tool calls" in text
    assert "[[a1<|im_end|>]]" in text  # the next row is still shown


def test_tokenize_writes_examples_in_input_order(tmp_path, no_weights, smol_tok):
    cfg = config(tmp_path, [qa(i) for i in range(4)] + [qa(5, "long " * 150)])
    out = tmp_path / "out" / "tok.jsonl"
    assert commands.tokenize(cfg, out=str(out)) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4  # the too-long row is dropped (and counted)
    expected = build_dataset(cfg, smol_tok).examples
    assert rows == [{"input_ids": e.input_ids, "labels": e.labels} for e in expected]
    trained = [[t for t in r["labels"] if t != IGNORE] for r in rows]
    assert [smol_tok.decode(t) for t in trained] == [f"a{i}<|im_end|>" for i in range(4)]
