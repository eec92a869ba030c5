from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sft.config import Config, DataConfig, EvalConfig, SourceConfig
from sft.data.pipeline import build_dataset, collect_conversations, load_conversations
from sft.data.types import IGNORE
from sft.errors import SftError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa(i):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def make_cfg(tmp_path, sources, **data):
    cfg = Config(data=DataConfig(train=[s if isinstance(s, SourceConfig) else SourceConfig(s) for s in sources],
                                 cache_dir=str(tmp_path / "cache"), **data))
    return cfg


def answers(convs):
    return [c.messages[-1].content for c in convs]


def test_mixed_formats_and_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    a = write_jsonl(tmp_path / "a.jsonl", [qa(0), qa(1)])
    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.csv").write_text("instruction,input,output\nhi,,c0\n")
    (d / "c.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "x"},
                                                            {"from": "gpt", "value": "c1"}]}], indent=1))
    pq.write_table(pa.Table.from_pylist([{"text": "doc"}]), tmp_path / "t.parquet")
    cfg = make_cfg(tmp_path, [a, str(d), str(tmp_path / "t.parquet")])
    convs, rep = load_conversations(cfg)
    assert answers(convs) == ["a0", "a1", "c0", "c1", "doc"]
    assert [(os.path.basename(c.source), c.line) for c in convs] == [
        ("a.jsonl", 1), ("a.jsonl", 2), ("b.csv", 2), ("c.json", 2), ("t.parquet", 1)]
    assert [(s.name, s.format, s.rows) for s in rep.sources] == [
        ("a.jsonl", "messages", 2), ("dir", "alpaca+sharegpt", 2), ("t.parquet", "text", 1)]
    # dir: the format is detected per file
    assert convs[-1].is_text and rep.rows == rep.valid == 5


def test_invalid_rows_error_lists_every_problem_with_file_and_line(tmp_path):
    rows = [qa(i) for i in range(45)]
    rows[40]["messages"].append({"role": "bot", "content": "x"})
    rows[42] = {"messages": [{"role": "user", "content": "no answer"}]}
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    with path.open("a") as f:
        f.write("{not json\n")
    cfg = make_cfg(tmp_path, [str(path)])
    with pytest.raises(SftError) as e:
        load_conversations(cfg)
    msg = str(e.value)
    assert f"{path}:41: messages[2].role is 'bot'; use one of system, user, assistant, tool" in msg
    assert f"{path}:43: no assistant turn; add at least one assistant message to train on" in msg
    assert f"{path}:46: not valid JSON (Expecting property name enclosed in double quotes at column 2)" in msg
    assert "data.on_invalid: skip" in msg

    cfg.data.on_invalid = "skip"
    convs, rep = load_conversations(cfg)
    assert len(convs) == 43 and rep.skipped == rep.invalid_rows == 3
    assert [(p["line"], p["error"][:20]) for p in rep.invalid] == [
        (41, "messages[2].role is "), (43, "no assistant turn; a"), (46, "not valid JSON (Expe")]


def test_unknown_format_row_is_reported(tmp_path):
    cfg = make_cfg(tmp_path, [write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}])])
    _, rep = collect_conversations(cfg)
    assert rep.invalid[0]["error"].startswith("row keys are ['question']; expected the keys of one format")


def test_forced_format_overrides_detection(tmp_path):
    rows = [{"text": "t", "prompt": "p", "completion": "c"}]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    assert load_conversations(make_cfg(tmp_path, [path]))[0][0].is_text is False  # prompt/completion first
    convs, _ = load_conversations(make_cfg(tmp_path, [SourceConfig(path, format="text")]))
    assert convs[0].is_text
    convs, _ = load_conversations(make_cfg(tmp_path, [path], format="text"))
    assert convs[0].is_text


def test_limit_weight_and_system(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [qa(100 + i) for i in range(10)])
    convs, rep = load_conversations(make_cfg(tmp_path, [SourceConfig(a, limit=3), b], system="S"))
    assert answers(convs)[:4] == ["a0", "a1", "a2", "a100"] and len(convs) == 13
    assert convs[0].messages[0].content == "S" and rep.sources[0].rows == 3
    convs, rep = load_conversations(make_cfg(tmp_path, [SourceConfig(a, weight=3.0), SourceConfig(b, weight=1.0)]))
    assert [s.used for s in rep.sources] == [15, 5]
    assert sum(x.startswith("a10") for x in answers(convs)) == 5


def test_duplicates_counted_and_removed_only_with_dedup(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [qa(0), qa(1), qa(0), qa(0)])
    convs, rep = load_conversations(make_cfg(tmp_path, [path]))
    assert (len(convs), rep.duplicates, rep.deduplicated) == (4, 2, 0)
    convs, rep = load_conversations(make_cfg(tmp_path, [path], dedup=True))
    assert (answers(convs), rep.duplicates, rep.deduplicated) == (["a0", "a1"], 2, 2)


def test_eval_split_and_eval_data(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(20)])
    cfg = make_cfg(tmp_path, [path])
    cfg.eval = EvalConfig(split=0.25)
    train, rep = load_conversations(cfg, "train")
    held, _ = load_conversations(cfg, "eval")
    assert (len(train), len(held), rep.held_out) == (15, 5, 5)
    assert sorted(answers(train) + answers(held), key=lambda s: int(s[1:])) == [f"a{i}" for i in range(20)]
    cfg.train.seed = 7  # control: another seed holds out other rows
    assert answers(load_conversations(cfg, "eval")[0]) != answers(held)
    cfg.eval = EvalConfig(data=[SourceConfig(write_jsonl(tmp_path / "e.jsonl", [qa(99)]), metric="exact")])
    held, _ = load_conversations(cfg, "eval")
    assert answers(held) == ["a99"] and held[0].metric == "exact"
    assert len(load_conversations(cfg, "train")[0]) == 20


def test_eval_split_is_taken_before_weighting_so_no_row_is_in_both(tmp_path):
    """A weight of 4 repeats rows of source a; eval.split must hold out rows before that, so no
    conversation is trained on and evaluated. Control: splitting after weighting (the old order,
    written out below with the same pure functions) puts copies of one row on both sides."""
    import random

    from sft.data.formats import conversation_key
    from sft.data.sources import mix_counts, sample_rows

    a = write_jsonl(tmp_path / "a.jsonl", [qa(i) for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [qa(100 + i) for i in range(20)])
    cfg = make_cfg(tmp_path, [SourceConfig(a, weight=4.0), SourceConfig(b, weight=1.0)])
    cfg.eval = EvalConfig(split=0.2)
    train, rep = load_conversations(cfg, "train")
    held, _ = load_conversations(cfg, "eval")
    keys_train, keys_held = {conversation_key(c) for c in train}, {conversation_key(c) for c in held}
    assert len(held) == rep.held_out == 8 and len(keys_held) == 8  # 20% of the 40 distinct rows
    assert len(train) == 32 and len(keys_train) < len(train)  # weighting did repeat training rows
    assert keys_train.isdisjoint(keys_held)
    # weight 1 of 5 keeps only part of b: some of b's rows are in neither set, none in both

    # control: weight first, then hold out of the weighted list -> a row lands in both
    rows = [[qa(i) for i in range(20)], [qa(100 + i) for i in range(20)]]
    rng = random.Random(cfg.train.seed)
    mixed = [json.dumps(src[j]) for src, k in zip(rows, mix_counts([20, 20], [4.0, 1.0]))
             for j in sample_rows(20, k, rng)]
    held_at = set(random.Random(cfg.train.seed).sample(range(len(mixed)), round(0.2 * len(mixed))))
    late_train = {m for i, m in enumerate(mixed) if i not in held_at}
    late_held = {m for i, m in enumerate(mixed) if i in held_at}
    assert not late_train.isdisjoint(late_held)


def test_eval_split_keeps_exact_duplicates_on_one_side(tmp_path):
    """Without data.dedup, repeated rows are kept; all copies go to the same side of the split."""
    from sft.data.formats import conversation_key

    path = write_jsonl(tmp_path / "a.jsonl", [qa(i % 10) for i in range(30)])  # each row 3 times
    cfg = make_cfg(tmp_path, [path])
    cfg.eval = EvalConfig(split=0.3)
    train, _ = load_conversations(cfg, "train")
    held, _ = load_conversations(cfg, "eval")
    assert (len(train), len(held)) == (21, 9)
    assert {conversation_key(c) for c in train}.isdisjoint({conversation_key(c) for c in held})


def test_missing_file_and_no_data(tmp_path):
    with pytest.raises(SftError, match="data file not found"):
        load_conversations(make_cfg(tmp_path, [str(tmp_path / "nope.jsonl")]))
    with pytest.raises(SftError, match="no training data"):
        load_conversations(make_cfg(tmp_path, []))


# --------------------------------------------------------------------------------------------- tokenized


def test_build_dataset_exact_tokens(tmp_path, smol_tok):
    path = write_jsonl(tmp_path / "a.jsonl", [qa(0)])
    ds = build_dataset(make_cfg(tmp_path, [path], system="S"), smol_tok, use_cache=False)
    (ex,) = ds.examples
    assert smol_tok.decode(ex.input_ids) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq0<|im_end|>\n<|im_start|>assistant\na0<|im_end|>\n")
    trained = [t for t in ex.labels if t != IGNORE]
    assert smol_tok.decode(trained) == "a0<|im_end|>"
    assert ds.report.trained_tokens == len(trained) == 3 and ds.report.total_tokens == len(ex)
    assert "<|im_start|>" in ds.template


def test_text_format_trains_every_token_and_appends_eos(tmp_path, smol_tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}])
    (ex,) = build_dataset(make_cfg(tmp_path, [path]), smol_tok, use_cache=False).examples
    assert ex.input_ids[-1] == smol_tok.eos_token_id
    assert ex.labels == [IGNORE, *ex.input_ids[1:]]


def test_length_drop_and_truncate(tmp_path, smol_tok):
    long_answer = "word " * 60
    rows = [qa(0), {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": long_answer}]},
            {"messages": [{"role": "user", "content": "x " * 60}, {"role": "assistant", "content": "a"}]}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    ds = build_dataset(make_cfg(tmp_path, [path], max_length=40), smol_tok, use_cache=False)
    assert (len(ds.examples), ds.report.dropped_too_long, ds.report.truncated) == (1, 2, 0)
    ds = build_dataset(make_cfg(tmp_path, [path], max_length=40, truncation="truncate"), smol_tok, use_cache=False)
    # row 3's prompt alone is longer than 40 tokens: truncating would leave nothing to train, so it is dropped
    assert (len(ds.examples), ds.report.dropped_too_long, ds.report.truncated) == (2, 1, 1)
    ex = ds.examples[1]
    assert len(ex) == 40 and ex.truncated and ex.num_trained > 0 and ex.line == 2


def test_untrainable_rows_are_counted(tmp_path, smol_tok):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]}
    ds = build_dataset(make_cfg(tmp_path, [write_jsonl(tmp_path / "a.jsonl", [row, qa(1)])]), smol_tok,
                       use_cache=False)
    assert (len(ds.examples), ds.report.dropped_untrainable) == (1, 1)


def test_cache_is_reused_and_invalidated(tmp_path, smol_tok):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [qa(i) for i in range(5)])
    cfg = make_cfg(tmp_path, [str(path)])
    first = build_dataset(cfg, smol_tok)
    second = build_dataset(cfg, smol_tok)
    assert not first.report.cached and second.report.cached
    assert [(e.input_ids, e.labels, e.line) for e in second.examples] == [
        (e.input_ids, e.labels, e.line) for e in first.examples]
    assert second.report.to_dict() | {"cached": False} == first.report.to_dict()
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".npy"}  # no pickle: every array loads without it
    assert all(np.load(p, allow_pickle=False) is not None for p in files if p.suffix == ".npy")
    cfg.data.max_length = 64  # control: a setting change is a miss
    assert not build_dataset(cfg, smol_tok).report.cached
    write_jsonl(path, [qa(i) for i in range(6)])  # an input change is a miss
    ds = build_dataset(cfg, smol_tok)
    assert not ds.report.cached and len(ds.examples) == 6


def test_build_dataset_strict_raises_and_never_caches_invalid(tmp_path, smol_tok):
    path = write_jsonl(tmp_path / "a.jsonl", [qa(0), {"messages": []}])
    cfg = make_cfg(tmp_path, [path])
    with pytest.raises(SftError, match=r"a.jsonl:2: no assistant turn"):
        build_dataset(cfg, smol_tok)
    ds = build_dataset(cfg, smol_tok, strict=False)
    assert len(ds.examples) == 1 and ds.report.invalid_rows == 1
    assert not (tmp_path / "cache").exists()


def test_dev_split_is_held_out_after_eval_split_and_before_weighting(tmp_path):
    """eval.dev_split takes its share of ALL training rows from what eval.split left: train, test
    and dev are disjoint and together are every row; eval.dev adds its own file to dev only."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": [
        {"role": "user", "content": f"question number {i} about topic {i * 7} please"},
        {"role": "assistant", "content": f"answer {i} is {i * 13} exactly"}]} for i in range(40)])
    cfg = make_cfg(tmp_path, [SourceConfig(a, weight=2.0)])
    cfg.eval = EvalConfig(split=0.25, dev_split=0.1)
    train, rep = load_conversations(cfg, "train")
    test, _ = load_conversations(cfg, "eval")
    dev, _ = load_conversations(cfg, "dev")
    t, e, d = set(answers(train)), set(answers(test)), set(answers(dev))
    assert (len(e), len(d), rep.held_out, rep.dev_held_out) == (10, 4, 10, 4)
    assert t.isdisjoint(e) and t.isdisjoint(d) and e.isdisjoint(d) and len(t | e | d) == 40
    assert len(train) == 26
    # the test rows are the same with or without a dev split: adding dev never moves a test row
    cfg_no_dev = make_cfg(tmp_path, [SourceConfig(a, weight=2.0)])
    cfg_no_dev.eval = EvalConfig(split=0.25)
    assert set(answers(load_conversations(cfg_no_dev, "eval")[0])) == e
    # eval.dev: a file of its own, added to the dev rows only
    cfg.eval.dev = [SourceConfig(write_jsonl(tmp_path / "dev.jsonl", [qa(99)]))]
    assert set(answers(load_conversations(cfg, "dev")[0])) == d | {"a99"}
    assert "a99" not in answers(load_conversations(cfg, "eval")[0])
    # control: without eval.dev_split there are no dev rows from training
    cfg.eval.dev_split = 0.0
    assert answers(load_conversations(cfg, "dev")[0]) == ["a99"]


def test_dev_split_config_errors():
    from sft.config import load_config

    with pytest.raises(SftError, match=r"eval.dev_split: 0.6 must be in \[0, 1\) and leave training rows"):
        load_config(None, ["--eval.split=0.5", "--eval.dev_split=0.6"])
    with pytest.raises(SftError, match=r"eval.before_after_split: dev, but there is no dev set"):
        load_config(None, ["--eval.before_after_split=dev"])
