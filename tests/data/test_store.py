"""The token store (sft.data.store) and the per-source cache (sft.data.source_cache)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from sft.config import Config, DataConfig, SourceConfig
from sft.data import source_cache
from sft.data.pipeline import build_dataset, collect_conversations, tokenize_conversations
from sft.data.store import Examples, StoreWriter, TokenStore
from sft.data.types import IGNORE
from sft.errors import SftError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa(i, tag="a"):
    return {"messages": [{"role": "user", "content": f"question {tag}{i}"},
                         {"role": "assistant", "content": f"answer {tag}{i} " * (1 + i % 5)}]}


def cfg_for(tmp_path, paths, **data):
    return Config(data=DataConfig(train=[SourceConfig(p) for p in paths], cache_dir=str(tmp_path / "cache"), **data))


def mapped(a):
    """Whether ``a`` is a view of a memory-mapped file (not a copy in the heap)."""
    return isinstance(a.base, np.memmap) and not a.flags.owndata


def add(writer, examples, rows):
    ids = np.concatenate([np.asarray(i, np.int32) for i, _ in examples])
    trained = np.concatenate([np.asarray(m, np.uint8) for _, m in examples])
    lengths = np.asarray([len(i) for i, _ in examples])
    n = len(examples)
    writer.add(ids, trained, lengths, row=np.asarray(rows), turn=np.full(n, -1), merged=np.zeros(n),
               truncated=np.zeros(n))


def test_store_round_trip_over_shards_and_atomic(tmp_path):
    d = tmp_path / "s"
    w = StoreWriter(d, shard_tokens=4)  # tiny shards: every add flushes one
    add(w, [([5, 6, 7], [0, 1, 1]), ([8, 9], [0, 1])], [0, 1])
    add(w, [([10, 11, 12, 13], [0, 0, 1, 0])], [2])
    assert not d.exists() and len(list(tmp_path.iterdir())) == 1  # only the temporary folder so far
    rows = {"file": np.zeros(3, np.int32), "line": np.asarray([1, 2, 3]), "first": np.arange(4)}
    store = w.finish(rows, {"files": ["a.jsonl"], "errors": []})
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    assert len(store.shards) == 2 and mapped(store.shards[0]["input_ids"])
    ex = Examples([store], np.zeros(3), np.asarray([2, 0, 1]))
    assert [(e.input_ids, e.labels, e.line) for e in ex] == [
        ([10, 11, 12, 13], [IGNORE, IGNORE, 12, IGNORE], 3),
        ([5, 6, 7], [IGNORE, 6, 7], 1),
        ([8, 9], [IGNORE, 9], 2),
    ]
    assert ex.lengths.tolist() == [4, 3, 2] and ex.trained_counts().tolist() == [1, 2, 1]
    assert ex[-1].source == "a.jsonl" and ex.keep(np.asarray([False, True, False]))[0].input_ids == [5, 6, 7]


def test_incomplete_or_damaged_store_is_not_trusted(tmp_path):
    w = StoreWriter(tmp_path / "s")
    add(w, [([1, 2], [0, 1])], [0])
    w.finish({"line": np.asarray([1])}, {"files": ["x"], "errors": []})
    assert TokenStore.open(tmp_path / "s") is not None
    (tmp_path / "s" / "00000.input_ids.npy").write_bytes(b"\x93NUMPY broken")
    assert TokenStore.open(tmp_path / "s") is None
    (tmp_path / "s" / "store.json").unlink()  # a store without its index (an interrupted write)
    assert TokenStore.open(tmp_path / "s") is None


def test_store_matches_list_tokenizing_exactly(tmp_path, smol_tok):
    rows = [qa(i) for i in range(12)] + [{"messages": [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y", "train": False}]}]
    cfg = cfg_for(tmp_path, [write_jsonl(tmp_path / "a.jsonl", rows)], max_length=44, truncation="truncate")
    ds = build_dataset(cfg, smol_tok)
    convs, report = collect_conversations(cfg)
    old = tokenize_conversations(convs, smol_tok, ds.template, cfg, report)  # the list path, kept as reference
    assert isinstance(ds.examples, Examples) and len(old) == len(ds.examples) == 12
    assert [(e.input_ids, e.labels, e.line, e.truncated) for e in ds.examples] == [
        (e.input_ids, e.labels, e.line, e.truncated) for e in old]
    for k in ("truncated", "dropped_untrainable", "dropped_too_long", "total_tokens", "trained_tokens", "lengths"):
        assert np.asarray(getattr(ds.report, k)).tolist() == np.asarray(getattr(report, k)).tolist(), k
    assert ds.report.truncated > 0 and ds.report.dropped_untrainable == 1  # the control cases happen


def count_encoded(monkeypatch):
    seen: list[str] = []
    real = source_cache.encode_chunk

    def spy(convs, enc):
        seen.extend(os.path.basename(c.source) for c in convs)
        return real(convs, enc)

    monkeypatch.setattr(source_cache, "encode_chunk", spy)
    return seen


def test_editing_one_of_three_files_retokenizes_only_that_file(tmp_path, smol_tok, monkeypatch):
    paths = [write_jsonl(tmp_path / f"{t}.jsonl", [qa(i, t) for i in range(4)]) for t in "abc"]
    cfg = cfg_for(tmp_path, paths)
    seen = count_encoded(monkeypatch)
    first = build_dataset(cfg, smol_tok)
    assert sorted(set(seen)) == ["a.jsonl", "b.jsonl", "c.jsonl"] and len(seen) == 12
    seen.clear()
    write_jsonl(tmp_path / "b.jsonl", [qa(i, "b") for i in range(5)])  # edit one file
    second = build_dataset(cfg, smol_tok)
    assert seen == ["b.jsonl"] * 5 and not second.report.cached and len(second.examples) == 13
    assert [e.input_ids for e in second.examples][:4] == [e.input_ids for e in first.examples][:4]
    seen.clear()
    os.utime(paths[0], ns=(1, 1))  # same content, new mtime: the pick is rebuilt, nothing re-tokenized
    cfg.data.train[2].weight = 2.0  # weights pick rows from the stores: nothing re-tokenized either
    cfg.data.train[0].weight = 1.0
    third = build_dataset(cfg, smol_tok)
    assert seen == [] and not third.report.cached
    cfg.data.max_length = 64  # control: a setting that changes tokens re-tokenizes every source
    build_dataset(cfg, smol_tok)
    assert sorted(set(seen)) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    seen.clear()
    assert build_dataset(cfg, smol_tok).report.cached and seen == []  # and the pick itself is cached


def test_worker_processes_give_the_same_store_and_name_bad_rows(tmp_path, smol_tok, monkeypatch):
    monkeypatch.setattr(source_cache, "CHUNK", 4)  # 40 rows -> 10 tasks over 2 workers
    rows = [qa(i) for i in range(40)]
    rows[17]["messages"][1]["tool_calls"] = [{"type": "function", "function": {"name": "zz_tool", "arguments": {}}}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    bad = "a.jsonl:18: messages[1] has tool calls"
    one = cfg_for(tmp_path / "one", [path], num_proc=1, on_invalid="skip")
    two = cfg_for(tmp_path / "two", [path], num_proc=2, on_invalid="skip")
    assert source_cache.num_workers(2, 40) == 2
    a, b = build_dataset(one, smol_tok), build_dataset(two, smol_tok)
    assert len(a.examples) == 39 and b.report.skipped == 1 and bad in b.report.problems()[0]
    assert [(e.input_ids, e.labels, e.line) for e in a.examples] == [(e.input_ids, e.labels, e.line) for e in b.examples]
    two.data.on_invalid = "error"
    with pytest.raises(SftError, match=re.escape(bad)):  # from the cached store: still named
        build_dataset(two, smol_tok)


def test_cached_split_reads_tokens_through_memory_maps(tmp_path, smol_tok):
    cfg = cfg_for(tmp_path, [write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(6)])])
    build_dataset(cfg, smol_tok)
    ds = build_dataset(cfg, smol_tok)
    assert ds.report.cached and isinstance(ds.examples, Examples)
    assert all(mapped(s["input_ids"]) and mapped(s["trained"]) for st in ds.examples.stores for s in st.shards)
    assert ds.report.lengths.tolist() == [len(e) for e in ds.examples]


def test_lint_is_cached_with_the_train_split(tmp_path, smol_tok, monkeypatch):
    from sft.data import chat
    from sft.data.pipeline import lint_dataset

    rows = [qa(i) for i in range(5)]  # rows 4 and 5 are cut before their end-of-turn marker
    cfg = cfg_for(tmp_path, [write_jsonl(tmp_path / "a.jsonl", rows)], max_length=44, truncation="truncate")
    first = build_dataset(cfg, smol_tok)
    assert first.lint == chat.lint(smol_tok, first.template, list(first.examples))
    assert any("2 rows never train an end-of-turn marker" in w and "a.jsonl:5" in w for w in first.lint)
    monkeypatch.setattr(chat, "lint", lambda *a: pytest.fail("lint recomputed on a warm start"))
    second = build_dataset(cfg, smol_tok)
    assert second.report.cached and lint_dataset(second, smol_tok) == first.lint
