"""The quality analysis cached per source (sft.data.quality_cache): editing one file of three
recomputes that file's facts only, the findings across files (near-duplicates, contamination) are
the same as computed from scratch, and a setting that changes the facts recomputes all."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest

from sft.config import Config, load_config
from sft.data import commands, quality_cache
from sft.data.pipeline import collect_conversations
from sft.data.quality import QualitySettings, find_problems


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3000)}" for _ in range(n)).capitalize() + "."


def _row(rng: random.Random, reply: str | None = None, prompt: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": prompt or _sentence(rng, 10)},
                         {"role": "assistant", "content": reply or _sentence(rng, 40)}]}


@pytest.fixture()
def three_files(tmp_path, monkeypatch, smol_tok):
    """a, b, c.jsonl (30 rows each): c:5 nearly repeats a:3 (one word changed), eval:2 copies b:7's reply,
    c:10 says boilerplate, b:12 an unfilled placeholder."""
    import sft.models.load

    monkeypatch.setattr(sft.models.load, "load_tokenizer", lambda name, trust_remote_code=False, **kw: smol_tok)
    rng = random.Random(0)
    files = {k: [_row(rng) for _ in range(30)] for k in "abc"}
    words = files["a"][2]["messages"][1]["content"].split()
    words[20] = "changed"
    files["c"][4] = {"messages": [files["a"][2]["messages"][0], {"role": "assistant", "content": " ".join(words)}]}
    files["c"][9] = {"messages": [files["c"][9]["messages"][0], {"role": "assistant", "content": "As an AI language model, I cannot."}]}
    files["b"][11] = _row(rng, reply="I am {{name}}, an assistant. " + _sentence(rng, 30))
    ev = [_row(rng) for _ in range(5)]
    ev[1] = _row(rng, reply=files["b"][6]["messages"][1]["content"])
    for k, rows in files.items():
        (tmp_path / f"{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    return tmp_path


def _cfg(tmp_path, boilerplate: str = "[]"):
    (tmp_path / "c.yaml").write_text(
        "model: smollm2-135m-instruct\n"
        f"data:\n  train: [a.jsonl, b.jsonl, c.jsonl]\n  cache_dir: {tmp_path / 'cache'}\n"
        f"  quality: {{boilerplate: {boilerplate}}}\neval:\n  data: [eval.jsonl]\n")
    return load_config(tmp_path / "c.yaml")


def _count(monkeypatch) -> dict[str, list[int]]:
    """Rows each computation was handed: facts per source, contamination hits per source."""
    calls: dict[str, list[int]] = {"facts": [], "hits": []}
    facts, hits = quality_cache.compute_facts, quality_cache.train_hits

    def count_facts(convs, settings, label, *a):
        calls["facts"].append(len(convs))
        return facts(convs, settings, label, *a)

    def count_hits(convs, grams, *a, **k):
        calls["hits"].append(len(convs))
        return hits(convs, grams, *a, **k)

    monkeypatch.setattr(quality_cache, "compute_facts", count_facts)
    monkeypatch.setattr(quality_cache, "train_hits", count_hits)
    return calls


def _quality(cfg) -> dict:
    out = io.StringIO()
    assert commands.check(cfg, as_json=True, stream=out) == 0
    return json.loads(out.getvalue())["quality"]


def test_editing_one_file_recomputes_only_that_file(three_files, monkeypatch):
    tmp = three_files
    calls = _count(monkeypatch)
    cfg = _cfg(tmp)
    first = _quality(cfg)
    assert calls == {"facts": [30, 30, 30], "hits": [30, 30, 30]}
    a, b, c, ev = (str(tmp / f"{k}.jsonl") for k in ("a", "b", "c", "eval"))
    assert first["near_duplicates"] == [{"file": c, "line": 5, "duplicate_of": {"file": a, "line": 3}, "similarity": 0.8868}]
    assert first["contamination"] == [{"eval": {"file": ev, "line": 2}, "train": {"file": b, "line": 7}, "overlap": 1.0}]
    assert [(x["file"], x["line"]) for x in first["boilerplate"]] == [(c, 10)]
    assert first["placeholders"] == [{"file": b, "line": 12,
                                      "why": 'messages[1] (assistant) has the unfilled placeholder "{{name}}"'}]

    with open(tmp / "b.jsonl", "a") as f:  # edit one file of three
        f.write(json.dumps(_row(random.Random(5))) + "\n")
    calls["facts"].clear(), calls["hits"].clear()
    again = _quality(cfg)
    assert calls == {"facts": [31], "hits": [31]}  # b only
    assert again == first  # the findings across files come from the other two files' cached facts
    train, _ = collect_conversations(cfg, "train")
    evals, _ = collect_conversations(cfg, "eval")
    scratch = find_problems(train, evals, QualitySettings())  # no cache at all
    assert scratch["near_duplicates"] == again["near_duplicates"] and scratch["contamination"] == again["contamination"]

    calls["facts"].clear(), calls["hits"].clear()
    changed = _quality(_cfg(tmp, boilerplate="['i cannot']"))  # control: a setting in the key recomputes all
    assert calls == {"facts": [30, 31, 30], "hits": [30, 31, 30]}
    assert [(x["file"], x["line"]) for x in changed["boilerplate"]] == [(c, 10)]


def test_progress_of_the_quality_stage_has_rate_and_eta():
    from sft.data.progress import Progress
    from sft.data.quality import row_facts
    from sft.data.types import Conversation, Message

    rng = random.Random(1)
    rows = [Conversation([Message("user", "q"), Message("assistant", _sentence(rng, 12))], "t.jsonl", i + 1)
            for i in range(5000)]
    ticks: list[int] = []
    out = io.StringIO()
    progress = Progress("quality t.jsonl", len(rows), stream=out, after=0.0, every=0.0)

    def tick(n: int) -> None:
        ticks.append(n)
        progress.update(n)

    facts = row_facts(rows, QualitySettings(), tick)
    progress.close()
    assert ticks == [2048, 2048, 904] and len(facts.keys) == 5000  # a chunk at a time, every row once
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[1] for line in lines] == ["2048/5000 rows", "4096/5000 rows", "5000/5000 rows", "5000/5000 rows"]
    assert all(" rows/s" in line for line in lines) and " | eta " in lines[0] and " | done in " in lines[-1]


def test_cached_signatures_give_the_same_band_keys(tmp_path):
    """The signatures are written to the cache a chunk at a time and read back a chunk at a time
    (never held whole); the band keys read back equal those computed, at any threshold."""
    from sft.data.minhash import band_keys
    from sft.data.overlap import row_signatures
    from sft.data.types import Conversation, Message

    rng = random.Random(2)
    rows = [Conversation([Message("user", "q"), Message("assistant", _sentence(rng, 12))], "t.jsonl", i + 1)
            for i in range(4500)]  # 3 chunks
    rows[7] = Conversation([Message("user", " "), Message("assistant", "")], "t.jsonl", 8)  # no shingle
    rows[3000] = Conversation([Message("user", "q"), Message("assistant", "I am {{name}}.")], "t.jsonl", 3001)
    d = tmp_path / "quality" / "k"
    made = quality_cache.compute_facts(rows, QualitySettings(), "t.jsonl", d)
    sig = row_signatures(rows)
    np.testing.assert_array_equal(np.load(d / "sig.npy"), sig)
    assert sorted(p.name for p in d.iterdir()) == ["facts.json", "keys.npy", "open_end.npy", "sig.npy", "words.npy"]
    for threshold in (0.8, 0.5):
        back = quality_cache.load_facts(d, len(rows), threshold)
        np.testing.assert_array_equal(back.bands, band_keys(sig, threshold))
        assert back.bands.shape == (4500, {0.8: 21, 0.5: 42}[threshold])
    np.testing.assert_array_equal(made.bands, band_keys(sig, 0.8))
    assert made.live.tolist() == [i != 7 for i in range(4500)]
    assert quality_cache.load_facts(d, len(rows) + 1, 0.8) is None  # control: another row count is not these facts
    back = quality_cache.load_facts(d, len(rows), 0.8)
    assert back.placeholders == made.placeholders and back.empty == made.empty  # the row checks' reasons kept
    assert [(i, why) for i, why in enumerate(back.placeholders) if why] == [
        (3000, 'messages[1] (assistant) has the unfilled placeholder "{{name}}"')]
    meta = json.loads((d / "facts.json").read_text())
    assert meta["version"] == quality_cache.FACTS_VERSION == 2 and meta["placeholders"] == {"3000": back.placeholders[3000]}
    (d / "facts.json").write_text(json.dumps({**meta, "version": 1}))  # a cache of before the kind: not read
    assert quality_cache.load_facts(d, len(rows), 0.8) is None


def test_trained_tokens_per_row_come_from_the_stores(tmp_path, smol_tok):
    """The length findings (cut at max_length, length outliers) of the pipeline, whose per-row
    trained tokens are counted from the stores by (source, row), equal those of the reference: the
    list path's examples summed per (file, line). Source a is weighted 3 to b's 1: some of its rows
    are used twice, and counted once."""
    from sft.config import DataConfig, SourceConfig
    from sft.data.pipeline import build_dataset, tokenize_conversations
    from sft.data.quality import unique_rows
    from sft.data.types import IGNORE

    rng = random.Random(3)
    data = [_row(rng) for _ in range(30)]
    data[4] = _row(rng, reply=_sentence(rng, 400))  # long: cut at max_length, an outlier
    data[9] = _row(rng, reply="Yes.")  # short: an outlier
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(_row(rng)) + "\n" for _ in range(30)))
    sources = [SourceConfig(str(tmp_path / "a.jsonl"), weight=3.0), SourceConfig(str(tmp_path / "b.jsonl"), weight=1.0)]
    cfg = Config(data=DataConfig(train=sources, max_length=512, truncation="truncate", cache_dir=str(tmp_path / "cache")))
    ds = build_dataset(cfg, smol_tok)
    convs, report = collect_conversations(cfg, "train")
    rows = unique_rows(convs)
    assert len(convs) == 60 and len(rows) == 45  # a: every row once and 15 again; b: 15 of its rows
    lengths: dict = {}
    cut: set = set()
    for e in tokenize_conversations(rows, smol_tok, ds.template, cfg, report):  # the reference
        lengths[(e.source, e.line)] = lengths.get((e.source, e.line), 0) + sum(x != IGNORE for x in e.labels)
        if e.truncated:
            cut.add((e.source, e.line))
    want = find_problems(rows, None, QualitySettings(), lengths, cut)
    a = str(tmp_path / "a.jsonl")
    assert ds.quality["truncated_responses"] == want["truncated_responses"] == [
        {"file": a, "line": 5, "why": "cut at data.max_length: the example is longer"}]
    assert ds.quality["length_outliers"] == want["length_outliers"]
    assert [(x["line"], x["why"].split(",")[0]) for x in want["length_outliers"]] == [(5, "434 trained tokens"), (10, "3 trained tokens")]
