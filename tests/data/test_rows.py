"""Rows of JSON Lines files held as where they are (sft.data.rows), and the store-side lint scan."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np

from sft.config import Config, DataConfig, SourceConfig
from sft.data.chat import lint
from sft.data.pipeline import build_dataset, collect_conversations
from sft.data.rows import Row, materialize
from sft.data.store import Examples
from sft.data.types import Conversation


def rows(n, words=200):
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"question {i}", "category": None},
                          {"role": "assistant", "content": " ".join(f"w{i}x{k}" for k in range(words))}]}
            for i in range(n)]


def cfg_for(tmp_path, path, **data):
    return Config(data=DataConfig(train=[SourceConfig(str(path))], cache_dir=str(tmp_path / "cache"), **data))


def test_jsonl_rows_are_read_again_exactly(tmp_path):
    data = rows(5)
    data[2]["messages"][2]["content"] = "caf\u00e9 \U0001f600"  # non-ASCII bytes before later rows' offsets
    jsonl, array = tmp_path / "a.jsonl", tmp_path / "a.json"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(r, ensure_ascii=False).encode() for r in data) + b"\r\n\n")
    array.write_text(json.dumps(data))
    lazy, _ = collect_conversations(cfg_for(tmp_path, jsonl))
    parsed, _ = collect_conversations(cfg_for(tmp_path, array))
    assert all(isinstance(c, Row) for c in lazy) and not any(isinstance(c, Row) for c in parsed)  # control
    assert [c.line for c in lazy] == [1, 2, 3, 4, 5]
    for row, conv in zip(materialize(lazy), parsed):
        assert type(row) is Conversation
        assert (row.messages, row.tools, row.is_text, row.category) == (conv.messages, conv.tools, conv.is_text, conv.category)
    assert lazy[2].messages[2].content == "caf\u00e9 \U0001f600" and lazy[2].location() == f"{jsonl}:3"
    assert lazy[2] == materialize(lazy)[2] and lazy[2] != lazy[3]


def test_reading_jsonl_does_not_hold_the_text(tmp_path):
    """The read rows of a JSONL file hold where they are, not their text; the same rows in a
    JSON array (parsed conversations) hold it all: the control."""
    data = rows(400)
    text = sum(len(m["content"]) for r in data for m in r["messages"])  # ~1 MB of characters
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "a.json").write_text(json.dumps(data))

    def held(name):
        tracemalloc.start()
        convs, _ = collect_conversations(cfg_for(tmp_path, tmp_path / name))
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(convs) == 400
        return size

    assert held("a.json") > text  # parsed conversations: every character and more
    assert held("a.jsonl") < text / 5


def test_dataset_from_jsonl_rows_equals_dataset_from_parsed_rows(tmp_path, smol_tok):
    data = rows(40, words=20) + rows(3, words=20)  # 3 exact duplicates
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "a.json").write_text(json.dumps(data))
    got = {}
    for name in ("a.jsonl", "a.json"):
        ds = build_dataset(cfg_for(tmp_path, tmp_path / name, dedup=True, max_length=64), smol_tok, use_cache=False)
        got[name] = ([(e.input_ids, e.labels, e.line) for e in ds.examples], ds.report.duplicates,
                     ds.report.deduplicated, {k: [(f["line"], f.get("why")) for f in v] for k, v in ds.quality.items()})
    assert got["a.jsonl"][1:3] == (3, 3)
    assert got["a.jsonl"] == got["a.json"]


def test_lint_scan_of_a_store_equals_the_lint_of_its_examples(tmp_path, smol_tok):
    data = rows(12, words=8)
    for r in data[:3]:
        r["messages"][2]["train"] = False  # nothing trained: dropped, so not in the store
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    ds = build_dataset(cfg_for(tmp_path, tmp_path / "a.jsonl"), smol_tok)
    ex = ds.examples
    assert isinstance(ex, Examples)
    template = ds.template
    assert lint(smol_tok, template, ex) == lint(smol_tok, template, list(ex))
    flags = ex.scan(smol_tok.bos_token_id, smol_tok.convert_tokens_to_ids("<|im_end|>"))
    assert not flags["no_eot"].any() and not flags["zero"].any()
    # control: a token no example trains is missing from every one
    assert ex.scan(None, 0)["no_eot"].all()
    np.testing.assert_array_equal(ex.trained_counts(), [e.num_trained for e in ex])
