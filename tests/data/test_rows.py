"""Rows of JSON Lines files held as where they are (sft.data.rows), and the store-side lint scan."""

from __future__ import annotations

import csv
import gc
import json
import tracemalloc

import numpy as np
import pytest

from sft.config import Config, DataConfig, SourceConfig
from sft.data.chat import lint
from sft.data.pipeline import build_dataset, collect_conversations
from sft.data.rows import Row, Spill, materialize
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
    array.write_text(json.dumps(data, indent=1))
    lazy, _ = collect_conversations(cfg_for(tmp_path, jsonl))
    spilled, _ = collect_conversations(cfg_for(tmp_path, array))
    assert all(isinstance(c, Row) for c in lazy + spilled)
    assert [c.line for c in lazy] == [1, 2, 3, 4, 5]
    assert [c.line for c in spilled] == [2, 19, 36, 53, 70]  # a JSON array's rows: the line each starts on
    for row, conv in zip(materialize(lazy), materialize(spilled)):
        assert type(row) is Conversation and type(conv) is Conversation
        assert (row.messages, row.tools, row.is_text, row.category) == (conv.messages, conv.tools, conv.is_text, conv.category)
    assert lazy[2].messages[2].content == "caf\u00e9 \U0001f600" and lazy[2].location() == f"{jsonl}:3"
    assert spilled[2].messages[2].content == "caf\u00e9 \U0001f600" and spilled[2].location() == f"{array}:36"
    assert lazy[2] == materialize(lazy)[2] and lazy[2] != lazy[3]


def _formats(tmp_path, data):
    """The same rows as JSON Lines, a JSON array, Parquet and CSV (prompt/completion columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{"prompt": r["messages"][1]["content"], "completion": r["messages"][2]["content"]} for r in data]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    (tmp_path / "a.json").write_text(json.dumps(flat))
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "a.parquet", row_group_size=150)
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(flat)
    return ["a.jsonl", "a.json", "a.parquet", "a.csv"]


def test_every_format_is_held_as_rows_and_read_again_exactly(tmp_path, monkeypatch):
    data = rows(7)
    data[3]["messages"][2]["content"] = "two\nlines, \"quoted\", caf\u00e9"  # a multi-line CSV cell
    names = _formats(tmp_path, data)
    held = {n: collect_conversations(cfg_for(tmp_path, tmp_path / n))[0] for n in names}
    monkeypatch.setattr(Spill, "add", lambda self, value: None)  # the control: parsed, as before
    parsed = {n: collect_conversations(cfg_for(tmp_path, tmp_path / n))[0] for n in names}
    for n in names:
        assert all(isinstance(c, Row) for c in held[n]), n
        assert not any(isinstance(c, Row) for c in parsed[n]) or n == "a.jsonl"
        assert materialize(held[n]) == parsed[n], n  # messages, file and line alike
    assert [c.line for c in held["a.csv"]] == [2, 3, 4, 5, 7, 8, 9]  # row 4's cell spans two lines
    assert [c.line for c in held["a.parquet"]] == [1, 2, 3, 4, 5, 6, 7]
    assert held["a.csv"][3].messages[1].content == "two\nlines, \"quoted\", caf\u00e9"


@pytest.mark.parametrize("name", ["a.jsonl", "a.json", "a.parquet", "a.csv"])
def test_reading_does_not_hold_the_text(tmp_path, monkeypatch, name):
    """The read rows of every format hold where they are, not their text; with the spill
    refusing rows (the control) the rows of the formats other than JSONL hold it all."""
    data = rows(400)
    text = sum(len(r["messages"][1]["content"]) + len(r["messages"][2]["content"]) for r in data)  # ~0.8 MB
    _formats(tmp_path, data)

    def held():
        tracemalloc.start()
        convs, _ = collect_conversations(cfg_for(tmp_path, tmp_path / name))
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(convs) == 400
        return size

    assert held() < text / 5
    monkeypatch.setattr(Spill, "add", lambda self, value: None)
    assert (held() > text) == (name != "a.jsonl")


def test_a_spill_file_goes_with_its_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "sft"))
    (tmp_path / "a.json").write_text(json.dumps(rows(3)))
    convs, _ = collect_conversations(cfg_for(tmp_path, tmp_path / "a.json"))
    spills = list((tmp_path / "sft" / "rows").iterdir())
    assert len(spills) == 1 and len(spills[0].read_text().splitlines()) == 3
    assert not (tmp_path / "cache").exists()  # data.cache_dir is not touched by reading
    del convs
    gc.collect()
    assert not (tmp_path / "sft" / "rows").exists()  # the folder too


def test_dataset_from_jsonl_rows_equals_dataset_from_parsed_rows(tmp_path, smol_tok, monkeypatch):
    data = rows(40, words=20) + rows(3, words=20)  # 3 exact duplicates
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "a.json").write_text(json.dumps(data))
    got = {}
    for name in ("a.jsonl", "a.json", "parsed"):
        if name == "parsed":  # the JSON array's rows kept parsed: the reference
            monkeypatch.setattr(Spill, "add", lambda self, value: None)
        path = tmp_path / ("a.json" if name == "parsed" else name)
        ds = build_dataset(cfg_for(tmp_path, path, dedup=True, max_length=64), smol_tok, use_cache=False)
        got[name] = ([(e.input_ids, e.labels, e.line) for e in ds.examples], ds.report.duplicates,
                     ds.report.deduplicated, {k: [(f["line"], f.get("why")) for f in v] for k, v in ds.quality.items()})
    assert got["a.jsonl"][1:3] == (3, 3)
    assert got["a.jsonl"] == got["a.json"] == got["parsed"]


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


def test_without_a_folder_for_the_spill_rows_stay_parsed(tmp_path, monkeypatch):
    """A cache folder that cannot hold the spill (here a file is in its way) is no error: the rows
    of a JSON array are then held parsed, as before the spill; the same rows as JSONL are not affected."""
    (tmp_path / "a.json").write_text(json.dumps(rows(3)))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(3)))
    (tmp_path / "sft").write_text("not a folder")
    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "sft"))
    parsed, _ = collect_conversations(cfg_for(tmp_path, tmp_path / "a.json"))
    lazy, _ = collect_conversations(cfg_for(tmp_path, tmp_path / "a.jsonl"))
    assert [type(c) for c in parsed] == [Conversation] * 3 and [type(c) for c in lazy] == [Row] * 3
    assert [c.messages for c in parsed] == [c.messages for c in materialize(lazy)]
