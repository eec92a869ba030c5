"""`datasets` sources: hub names, ``save_to_disk`` folders and Arrow shards, read a batch at a time.

A ``data.train`` entry is one of:
- a file or folder of ``.jsonl``/``.json``/``.parquet``/``.csv`` files (``sources.py`` reads them);
- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split:`` picks
  the split of a ``DatasetDict``, default ``train``);
- an ``.arrow`` file or a folder of them, as ``datasets`` writes them (e.g. its cache);
- a hub dataset name ``org/name`` that is not a path on disk, with ``subset:`` (the
  configuration), ``split:`` (default ``train``), ``revision:`` and ``streaming:``. It is loaded
  with ``datasets.load_dataset`` into the ``datasets`` cache (``$HF_DATASETS_CACHE``, else
  ``$HF_HOME/datasets``); with ``HF_HUB_OFFLINE=1`` the cached copy is used. With
  ``streaming: true`` rows are read as they download and the set is never stored whole; add
  ``limit:`` to take the first rows of a large set (reading stops there). Rows of every source
  but JSON Lines files are then held as lines of a temporary spill file (``sft.data.rows.Spill``),
  not as parsed conversations, so memory does not grow with their text.

Every reader yields ``sources.Record``s numbered by 1-based row, like Parquet, under a label that
names the source (``org/name[train]``), so row errors read ``org/name[train]:41: ...``.

Column mapping (``messages_field``, ``prompt_field``, ``completion_field``, ``text_field``) renames a
row's columns to the keys the formats expect, for any source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft.config import SourceConfig
from sft.data.sources import SUFFIXES, Record, list_files, read_file
from sft.errors import SftError

BATCH = 1024  # rows per Arrow record batch read
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
FIELDS = {  # SourceConfig key -> the row key the formats read
    "messages_field": "messages",
    "prompt_field": "prompt",
    "completion_field": "completion",
    "text_field": "text",
}
_TRUE = ("1", "ON", "YES", "TRUE")


# ---------------------------------------------------------------------------------------------
# column mapping


def column_mapping(src: SourceConfig) -> dict[str, str]:
    """``{their column: our key}`` from the source's ``*_field`` keys.

    >>> column_mapping(SourceConfig("x", prompt_field="question", completion_field="answer"))
    {'question': 'prompt', 'answer': 'completion'}
    """
    out = {}
    for key, ours in FIELDS.items():
        theirs = getattr(src, key)
        if theirs:
            out[theirs] = ours
    return out


def map_columns(row: Any, mapping: dict[str, str]) -> tuple[Any, list[str]]:
    """``row`` with its columns renamed by ``mapping`` (mapped columns replace same-named ones),
    or the problems when a mapped column is missing. A ``messages_field`` that holds ShareGPT
    turns (``from``/``value``) becomes ``conversations``.

    >>> map_columns({"question": "2+2?", "answer": "4", "id": 7}, {"question": "prompt", "answer": "completion"})
    ({'id': 7, 'prompt': '2+2?', 'completion': '4'}, [])
    >>> map_columns({"q": "?"}, {"question": "prompt"})[1]
    ["column 'question' (prompt_field) is missing; the row's columns are ['q']; fix prompt_field"]
    >>> map_columns({"conv": [{"from": "human", "value": "hi"}]}, {"conv": "messages"})[0]
    {'conversations': [{'from': 'human', 'value': 'hi'}]}
    """
    if not mapping or not isinstance(row, dict):
        return row, []
    keys = {ours: key for key, ours in FIELDS.items()}
    missing = [f"column {col!r} ({keys[ours]}) is missing; the row's columns are {sorted(row)}; fix {keys[ours]}"
               for col, ours in mapping.items() if col not in row]
    if missing:
        return row, missing
    renamed = {}
    for col, ours in mapping.items():
        value = row[col]
        if ours == "messages" and isinstance(value, list) and value and isinstance(value[0], dict) \
                and "from" in value[0] and "role" not in value[0]:
            ours = "conversations"
        renamed[ours] = value
    out = {k: v for k, v in row.items() if k not in mapping and k not in renamed}
    out.update(renamed)
    return out, []


# ---------------------------------------------------------------------------------------------
# which kind of source


def _hub_offline() -> bool:
    value = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") or ""
    return value.upper() in _TRUE


def datasets_cache() -> Path:
    """The ``datasets`` cache, read from the environment now (``datasets`` reads it at import)."""
    env = os.environ
    if env.get("HF_DATASETS_CACHE"):
        return Path(os.path.expandvars(env["HF_DATASETS_CACHE"])).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "datasets"


_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets writes beside .arrow


def _is_arrow_dir(path: Path) -> bool:
    files = [p for p in path.rglob("*") if p.is_file() and p.name not in _METADATA]
    return any(p.suffix == ".arrow" for p in files) and not any(p.suffix.lower() in SUFFIXES for p in files)


def source_kind(src: SourceConfig, path: Path) -> str:
    """``files``, ``disk`` (save_to_disk), ``arrow`` or ``hub`` for a source whose path resolved to ``path``.

    >>> source_kind(SourceConfig("HuggingFaceH4/ultrachat_200k"), Path("HuggingFaceH4/ultrachat_200k"))
    'hub'
    >>> source_kind(SourceConfig("data/train.jsonl"), Path("data/train.jsonl"))
    'files'
    """
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        kind = "disk"
    elif (path.is_file() and path.suffix == ".arrow") or (path.is_dir() and _is_arrow_dir(path)):
        kind = "arrow"
    elif not path.exists() and HUB_NAME.fullmatch(src.path) and Path(src.path).suffix.lower() not in SUFFIXES:
        kind = "hub"
    else:
        kind = "files"
    if kind != "hub":
        used = [k for k in ("subset", "revision") if getattr(src, k, None)]
        if used:
            raise SftError(f"{src.path}: {' and '.join(used)} apply to hub datasets (org/name), and this is a "
                           f"local {'file' if kind == 'files' else 'dataset'} ({path}); remove {', '.join(used)}")
    if src.split and path.is_file():
        raise SftError(f"{src.path}: split: applies to hub datasets, DatasetDict folders and folders of shards, "
                       "and this is one file; remove split:")
    return kind


def label(src: SourceConfig, path: Path, kind: str, split: str | None = None) -> str:
    """How rows of the source are named in errors and reports (before ``:ROW``)."""
    if kind == "hub":
        sub = f"{src.subset}/" if src.subset else ""
        return f"{src.path}[{sub}{split or 'train'}]"
    if kind == "disk" and split:
        return f"{path}[{split}]"
    return str(path)


# ---------------------------------------------------------------------------------------------
# readers


def read_arrow(path: Path) -> Iterator[Record]:
    """Rows of an Arrow file (the IPC stream format ``datasets`` writes, or the file format),
    memory-mapped and read a record batch at a time; LINE is the 1-based row number."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            batches: Any = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source = pa.memory_map(str(path))
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowInvalid) as e:
        raise SftError(f"{path}: not a readable Arrow file ({e}); re-write it with datasets or pyarrow") from None
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            n += 1
            yield Record(n, row)


def split_files(root: Path, files: list[Path], split: str | None) -> list[Path]:
    """The shards of ``split`` among ``files`` under ``root``: those whose path below ``root`` has
    ``split`` as a folder or as a dash/underscore/dot-separated part of the file name, as the hub
    and ``datasets`` name them (``data/train-00000-of-00002.parquet``, ``default/train/0000.parquet``,
    ``name-train.arrow``). All files when ``split`` is None.

    >>> fs = [Path("d/data/train-00000-of-00001.parquet"), Path("d/data/test-00000-of-00001.parquet")]
    >>> [f.name for f in split_files(Path("d"), fs, "test")]
    ['test-00000-of-00001.parquet']
    >>> [f.name for f in split_files(Path("d"), [Path("d/c-train.arrow"), Path("d/c-train_sft.arrow")], "train_sft")]
    ['c-train_sft.arrow']
    """
    if not split:
        return files
    part = re.compile(rf"(^|[-_.]){re.escape(split)}($|[-.])")
    picked = [f for f in files
              if split in f.relative_to(root).parts[:-1] or part.search(f.name.rsplit(".", 1)[0] + ".")]
    if not picked:
        raise SftError(f"{root}: no file of split {split!r} (named like {split}-00000-of-00001.parquet, "
                       f"*-{split}.arrow or in a folder {split}/); check split:")
    return picked


def _arrow_files(path: Path, split: str | None) -> list[Path]:
    return [path] if path.is_file() else split_files(path, sorted(path.rglob("*.arrow")), split)


def _rows(ds: Any) -> Iterator[Record]:
    """Rows of a ``datasets`` Dataset (memory-mapped Arrow, a batch at a time) or IterableDataset."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        n = 0
        for table in ds.with_format("arrow").iter(batch_size=BATCH):
            for row in table.to_pylist():
                n += 1
                yield Record(n, row)
    else:
        for n, row in enumerate(ds, start=1):
            yield Record(n, row)


def _pick_split(d: Any, split: str | None, where: str) -> tuple[Any, str | None]:
    """The split of a DatasetDict (``split``, else ``train``, else its only split)."""
    import datasets

    if not isinstance(d, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return d, split
    names = list(d)
    chosen = split or ("train" if "train" in names else (names[0] if len(names) == 1 else None))
    if chosen not in names:
        raise SftError(f"{where}: has splits {', '.join(names)}; set split: to one of them")
    return d[chosen], chosen


def _load_disk(path: Path, split: str | None) -> tuple[Any, str | None]:
    import datasets

    try:
        d = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise SftError(f"{path}: not a readable save_to_disk folder ({type(e).__name__}: {e}); "
                       "re-save it with Dataset.save_to_disk") from None
    return _pick_split(d, split, str(path))


def _hub_error(src: SourceConfig, path: Path, e: BaseException) -> SftError:
    """One line: what `datasets` said, where the set was looked for, how to fix."""
    from datasets.naming import camelcase_to_snakecase

    org, name = src.path.split("/", 1)
    cached = datasets_cache() / f"{org}___{camelcase_to_snakecase(name)}"
    said = " ".join(str(e).split()) or type(e).__name__
    if _hub_offline():
        hub = "HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set, so the hub was not asked"
    elif "reach" in said:
        hub = "the Hugging Face Hub could not be reached"
    else:
        hub = "on the Hugging Face Hub"
    return SftError(
        f"{src.path}: could not load the dataset ({type(e).__name__}: {said}). Looked on disk ({path.resolve()}), "
        f"in the datasets cache ({cached}), and {hub}. Check the name (org/name, as on huggingface.co/datasets), "
        "subset: and split:; for a gated or private set log in with `hf auth login` (or set HF_TOKEN); to use it "
        "offline, load it once with network access (HF_HUB_OFFLINE unset) so it is cached"
    )


def load_hub(src: SourceConfig, path: Path) -> Any:
    """``datasets.load_dataset`` of a hub source: a Dataset, or an IterableDataset when streaming."""
    import datasets
    from datasets.exceptions import DatasetsError

    split = src.split or "train"
    try:
        return datasets.load_dataset(
            src.path, src.subset, split=split, revision=src.revision,
            streaming=src.streaming, cache_dir=str(datasets_cache()),
        )
    except (DatasetsError, OSError, ValueError, KeyError) as e:  # OSError: ConnectionError, FileNotFoundError
        raise _hub_error(src, path, e) from None


def iter_source(src: SourceConfig, path: Path) -> Iterator[tuple[str, Iterator[Record]]]:
    """``(label, records)`` for each part of a source, in order: each file of a file source, each
    shard of Arrow shards, or the one split of a save_to_disk folder or hub dataset."""
    kind = source_kind(src, path)
    split = src.split
    if kind == "files":
        for f in split_files(path, list_files(path), split) if path.is_dir() else list_files(path):
            yield str(f), read_file(f)
    elif kind == "arrow":
        for f in _arrow_files(path, split):
            yield str(f), read_arrow(f)
    elif kind == "disk":
        ds, chosen = _load_disk(path, split)
        yield label(src, path, kind, chosen if (path / "dataset_dict.json").is_file() else None), _rows(ds)
    else:
        yield label(src, path, kind, split), _rows(load_hub(src, path))


def fingerprint(src: SourceConfig, path: Path) -> list[Any]:
    """What identifies the data of a source for the tokenized-data cache: path/size/mtime of its
    files; for a hub dataset its name, subset, split, revision, the commit the hub resolves it to
    (online) and the ``datasets`` cache folders that hold it."""
    kind = source_kind(src, path)
    if kind == "files":
        files = split_files(path, list_files(path), src.split) if path.is_dir() else list_files(path)
    elif kind == "arrow":
        files = _arrow_files(path, src.split)
    elif kind == "disk":
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return _hub_fingerprint(src)
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _hub_fingerprint(src: SourceConfig) -> list[Any]:
    from datasets.naming import camelcase_to_snakecase

    sha = None
    if not _hub_offline():
        try:
            from huggingface_hub import HfApi

            sha = HfApi().dataset_info(src.path, revision=src.revision, timeout=10).sha
        except Exception:  # unreachable or unknown: load_hub reports it; the cache folders still count
            sha = None
    org, name = src.path.split("/", 1)
    root = datasets_cache() / f"{org}___{camelcase_to_snakecase(name)}"
    cached = sorted([str(p), p.stat().st_mtime_ns] for p in root.glob("*/*/*/dataset_info.json"))
    return [["hub", src.path, src.subset, src.split,
             src.revision, src.streaming, sha, cached]]
