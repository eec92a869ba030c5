"""`datasets` sources: save_to_disk folders, Parquet and Arrow shards, hub names (offline, from a
real `datasets` cache), streaming, column mapping, and errors that name the source and the row.

No test reaches a hub. ``datasets_cache_repo`` fills the `datasets` cache the way
``load_dataset("org/name")`` does after a download: datasets' own Parquet builder with the hub
path's parameters (repo_id, dataset name, config "default" or a subset, the commit as hash) writes
``org___name/<config>/0.0.0/<commit>/{dataset_info.json,name-<split>.arrow}``; only the data files
come from a local folder instead of ``hf://``. ``load_dataset`` then finds it through its offline
fallback, the path a user with a cached set and no network takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft.config import Config, DataConfig, SourceConfig
from sft.data.pipeline import build_dataset, collect_conversations, load_conversations
from sft.errors import SftError

COMMIT = "c0ffee" + "0123456789abcdef0123456789abcdef01"  # 40 hex digits


def chat(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer {i}"}]}


def make_cfg(tmp_path: Path, *sources: SourceConfig) -> Config:
    return Config(data=DataConfig(train=list(sources), cache_dir=str(tmp_path / "cache")))


def answers(convs: list[Any]) -> list[str]:
    return [c.messages[-1].content for c in convs]


def datasets_cache_repo(cache: Path, repo_id: str, splits: dict[str, list[dict[str, Any]]], work: Path,
                        subset: str = "default", commit: str = COMMIT) -> Path:
    """Write ``splits`` of hub dataset ``repo_id`` (configuration ``subset``) into the datasets cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in splits.items():
        f = work / f"{repo_id.replace('/', '_')}-{subset}-{split}.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), f)
        files[split] = str(f)
    builder = Parquet(cache_dir=str(cache), dataset_name=repo_id.split("/")[1], config_name=subset,
                      config_id=subset, data_files=files, hash=commit)
    # set after __init__, which checks that data files live under hf://datasets/REPO (ours are local)
    builder.repo_id = repo_id
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return Path(builder.cache_dir)


@pytest.fixture()
def hf_home(tmp_path: Path, monkeypatch: Any) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "org/name" is not a path here
    return home


# ---------------------------------------------------------------------------------------------
# local `datasets` outputs


def test_save_to_disk_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([chat(i) for i in range(5)]).save_to_disk(str(tmp_path / "ds"))
    convs, report = load_conversations(make_cfg(tmp_path, SourceConfig(str(tmp_path / "ds"))))
    assert answers(convs) == [f"answer {i}" for i in range(5)]
    assert [c.messages[0].content for c in convs] == [f"question {i}" for i in range(5)]
    assert [(c.source, c.line) for c in convs][:2] == [(str(tmp_path / "ds"), 1), (str(tmp_path / "ds"), 2)]
    assert report.sources[0].rows == 5 and report.sources[0].format == "messages"


def test_save_to_disk_dataset_dict_splits(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([chat(i) for i in range(3)]),
        "test": datasets.Dataset.from_list([chat(i) for i in range(10, 12)]),
    }).save_to_disk(str(d))
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(d))))
    assert answers(convs) == ["answer 0", "answer 1", "answer 2"]  # default: train
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(d), split="test")))
    assert answers(convs) == ["answer 10", "answer 11"]
    assert convs[0].source == f"{d}[test]"
    with pytest.raises(SftError, match=r"dd: has splits train, test; set split: to one of them"):
        load_conversations(make_cfg(tmp_path, SourceConfig(str(d), split="validation")))


def test_row_errors_name_the_source_and_row(tmp_path: Path) -> None:
    import datasets

    rows = [chat(0), chat(1), {"messages": [{"role": "bot", "content": "hi"}]}, chat(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(SftError) as e:
        load_conversations(make_cfg(tmp_path, SourceConfig(str(tmp_path / "ds"))))
    assert f"{tmp_path / 'ds'}:3: messages[0].role is 'bot'" in str(e.value)
    assert f"{tmp_path / 'ds'}:4:" not in str(e.value)  # control: the good rows are not listed


def test_parquet_shards_from_datasets(tmp_path: Path) -> None:
    import datasets

    d = tmp_path / "shards"
    d.mkdir()
    for k in range(2):
        datasets.Dataset.from_list([chat(10 * k + i) for i in range(3)]).to_parquet(
            str(d / f"train-0000{k}-of-00002.parquet"))
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(d))))
    assert answers(convs) == [f"answer {i}" for i in (0, 1, 2, 10, 11, 12)]
    assert [c.line for c in convs] == [1, 2, 3, 1, 2, 3]
    assert convs[3].source == str(d / "train-00001-of-00002.parquet")


def test_split_of_a_folder_of_shards(tmp_path: Path) -> None:
    """A clone of a hub dataset repo: data/{train,test}-0000k-of-0000n.parquet."""
    import datasets

    d = tmp_path / "repo"
    (d / "data").mkdir(parents=True)
    for split, first in (("train", 0), ("test", 50)):
        for k in range(2):
            datasets.Dataset.from_list([chat(first + 10 * k)]).to_parquet(str(d / "data" / f"{split}-0000{k}-of-00002.parquet"))
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(d), split="test")))
    assert answers(convs) == ["answer 50", "answer 60"]
    everything, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(d))))  # control: no split, all files
    assert sorted(answers(everything)) == sorted(["answer 0", "answer 10", "answer 50", "answer 60"])
    with pytest.raises(SftError, match=r"no file of split 'validation'"):
        load_conversations(make_cfg(tmp_path, SourceConfig(str(d), split="validation")))
    with pytest.raises(SftError, match=r"split: applies to hub datasets, DatasetDict folders and folders of shards"):
        load_conversations(make_cfg(tmp_path, SourceConfig(str(d / "data" / "test-00000-of-00002.parquet"), split="test")))


def test_arrow_shards_of_the_datasets_cache(tmp_path: Path) -> None:
    cached = datasets_cache_repo(tmp_path / "dc", "org/chat-set",
                                 {"train": [chat(i) for i in range(4)], "test": [chat(9)]}, tmp_path / "raw")
    assert sorted(p.name for p in cached.glob("*.arrow")) == ["chat-set-test.arrow", "chat-set-train.arrow"]
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(cached), split="train")))
    assert answers(convs) == [f"answer {i}" for i in range(4)]
    one, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(cached / "chat-set-test.arrow"))))
    assert answers(one) == ["answer 9"]
    both, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(cached))))
    assert sorted(answers(both)) == sorted([f"answer {i}" for i in range(4)] + ["answer 9"])


# ---------------------------------------------------------------------------------------------
# hub names, offline from the datasets cache


def test_hub_name_from_the_datasets_cache_offline(tmp_path: Path, hf_home: Path) -> None:
    datasets_cache_repo(hf_home / "datasets", "org/chat-set",
                        {"train": [chat(i) for i in range(6)], "test": [chat(100)]}, tmp_path / "raw")
    convs, report = load_conversations(make_cfg(tmp_path, SourceConfig("org/chat-set")))
    assert answers(convs) == [f"answer {i}" for i in range(6)]
    assert (convs[0].source, convs[0].line) == ("org/chat-set[train]", 1)
    assert report.sources[0].name == "chat-set"
    test, _ = load_conversations(make_cfg(tmp_path, SourceConfig("org/chat-set", split="test")))
    assert answers(test) == ["answer 100"]


def test_hub_subset(tmp_path: Path, hf_home: Path) -> None:
    cache = hf_home / "datasets"
    datasets_cache_repo(cache, "org/multi", {"train": [chat(1)]}, tmp_path / "raw", subset="easy")
    datasets_cache_repo(cache, "org/multi", {"train": [chat(2), chat(3)]}, tmp_path / "raw", subset="hard")
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig("org/multi", subset="hard")))
    assert answers(convs) == ["answer 2", "answer 3"]
    assert convs[0].source == "org/multi[hard/train]"
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig("org/multi", subset="easy")))
    assert answers(convs) == ["answer 1"]
    with pytest.raises(SftError, match=r"org/multi: could not load the dataset .*multiple 'org/multi' configurations"):
        load_conversations(make_cfg(tmp_path, SourceConfig("org/multi")))


def test_hub_streaming_reads_an_iterable_dataset(tmp_path: Path, hf_home: Path, monkeypatch: Any) -> None:
    import datasets

    monkeypatch.setenv("SFT_CACHE", str(tmp_path / "sft"))

    from sft.data.hub import load_hub

    datasets_cache_repo(hf_home / "datasets", "org/big", {"train": [chat(i) for i in range(50)]}, tmp_path / "raw")
    src = SourceConfig("org/big", streaming=True, limit=7)
    assert isinstance(load_hub(src, Path("org/big")), datasets.IterableDataset)
    assert isinstance(load_hub(SourceConfig("org/big"), Path("org/big")), datasets.Dataset)  # control
    convs, report = load_conversations(make_cfg(tmp_path, src))
    assert answers(convs) == [f"answer {i}" for i in range(7)]
    assert report.sources[0].rows == 7  # reading stopped at the limit
    # held as rows of a spill file, not as parsed conversations: the memory of a streamed set does not grow with its text
    from sft.data.rows import Row

    assert all(isinstance(c, Row) for c in convs) and [c.location() for c in convs] == [f"org/big[train]:{i}" for i in range(1, 8)]
    (spill,) = (tmp_path / "sft" / "rows").iterdir()
    assert [json.loads(line)["messages"][1]["content"] for line in spill.read_text().splitlines()] == answers(convs)


def test_missing_hub_dataset_is_one_clear_error(tmp_path: Path, hf_home: Path) -> None:
    with pytest.raises(SftError) as e:
        load_conversations(make_cfg(tmp_path, SourceConfig("org/not-there")))
    msg = str(e.value)
    assert msg.startswith("org/not-there: could not load the dataset")
    assert "\n" not in msg
    assert str(tmp_path / "org" / "not-there") in msg  # the disk
    assert str(hf_home / "datasets" / "org___not-there") in msg  # the datasets cache
    assert "HF_HUB_OFFLINE" in msg and "hf auth login" in msg


def test_missing_local_folder_is_not_taken_for_a_hub_name(tmp_path: Path, hf_home: Path) -> None:
    with pytest.raises(SftError, match=r"data/train.jsonl: data file not found"):
        load_conversations(make_cfg(tmp_path, SourceConfig("data/train.jsonl")))


def test_hub_keys_on_a_local_file_are_an_error(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps(chat(0)) + "\n")
    with pytest.raises(SftError, match=r"subset and revision apply to hub datasets .*remove subset, revision"):
        load_conversations(make_cfg(tmp_path, SourceConfig(str(f), subset="x", revision="main")))


def test_tokenized_cache_follows_the_hub_source(tmp_path: Path, hf_home: Path, smol_tok: Any) -> None:
    datasets_cache_repo(hf_home / "datasets", "org/chat-set", {"train": [chat(i) for i in range(3)],
                                                                "test": [chat(7)]}, tmp_path / "raw")
    cfg = make_cfg(tmp_path, SourceConfig("org/chat-set"))
    first = build_dataset(cfg, smol_tok)
    again = build_dataset(cfg, smol_tok)
    assert not first.report.cached and again.report.cached
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in first.examples]
    other = build_dataset(make_cfg(tmp_path, SourceConfig("org/chat-set", split="test")), smol_tok)
    assert not other.report.cached and len(other.examples) == 1  # another split, another key


# ---------------------------------------------------------------------------------------------
# column mapping


def test_messages_field(tmp_path: Path) -> None:
    import datasets

    rows = [{"conversation": r["messages"], "messages": "stale", "id": i} for i, r in enumerate(chat(i) for i in range(3))]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    convs, _ = load_conversations(make_cfg(tmp_path, SourceConfig(str(tmp_path / "ds"), messages_field="conversation")))
    assert answers(convs) == ["answer 0", "answer 1", "answer 2"]
    # control: without the mapping the stale `messages` column is read and rejected
    convs, report = collect_conversations(make_cfg(tmp_path, SourceConfig(str(tmp_path / "ds"))))
    assert convs == [] and report.invalid_rows == 3


def test_prompt_and_completion_fields(tmp_path: Path) -> None:
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n" for i in range(2)))
    src = SourceConfig(str(f), prompt_field="question", completion_field="answer")
    convs, report = load_conversations(make_cfg(tmp_path, src))
    assert [[(m.role, m.content) for m in c.messages] for c in convs] == [
        [("user", "q0?"), ("assistant", "a0")], [("user", "q1?"), ("assistant", "a1")]]
    assert report.sources[0].format == "prompt_completion"
    with pytest.raises(SftError, match=r"qa.jsonl:1: row keys are \['answer', 'question'\]"):  # control
        load_conversations(make_cfg(tmp_path, SourceConfig(str(f))))


def test_sharegpt_column_and_missing_column(tmp_path: Path) -> None:
    f = tmp_path / "sg.jsonl"
    rows = [{"dialog": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, {"other": 1}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    convs, report = collect_conversations(make_cfg(tmp_path, SourceConfig(str(f), messages_field="dialog")))
    assert [(m.role, m.content) for m in convs[0].messages] == [("user", "hi"), ("assistant", "hello")]
    assert report.problems() == [
        f"{f}:2: column 'dialog' (messages_field) is missing; the row's columns are ['other']; fix messages_field"]


def test_config_keys(tmp_path: Path) -> None:
    from sft.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("model: org/model\nrevision: v2\ndata:\n  train:\n    - path: HuggingFaceH4/ultrachat_200k\n"
                 "      split: train_sft\n      subset: default\n      revision: main\n      streaming: true\n"
                 "      limit: 100\n      messages_field: messages\n")
    cfg = load_config(p)
    assert cfg.revision == "v2"
    s = cfg.data.train[0]
    assert (s.path, s.split, s.subset, s.revision, s.streaming, s.limit) == (
        "HuggingFaceH4/ultrachat_200k", "train_sft", "default", "main", True, 100)
    p.write_text("data:\n  train:\n    - path: x\n      splitt: train\n")
    with pytest.raises(SftError, match="did you mean 'split'"):
        load_config(p)
