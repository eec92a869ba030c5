"""Tokenize one source's conversations into a token store, in worker processes, cached per source.

One store per source (``<cache_dir>/sources/<key>/``, ``sft.data.store``), keyed by the content of
its files (sha256; for a hub dataset its name/revision/split and resolved commit), the tokenizer,
the template, every setting that changes the tokens and the code that encodes: editing one file of
three re-tokenizes that source only, and a weight, dedup, eval split or quality change re-tokenizes
nothing (those pick examples from the stores, ``sft.data.pipeline``).

Row ``r`` of a store is the source's ``r``-th valid conversation in reading order; per row it
keeps the count of examples kept and dropped (too long, nothing to train, truncated) and the
encoding error, if any, so the pipeline can count each use of a row exactly as before.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sft.config import Config, SourceConfig, resolve_path
from sft.data import hub
from sft.data.progress import Progress
from sft.data.store import StoreWriter, TokenStore
from sft.data.types import IGNORE, Conversation
from sft.errors import SftError

KEY_VERSION = 1
CHUNK = 256  # conversations per task sent to a worker
TOKEN_FIELDS = ("format", "template", "train_on", "reasoning", "max_length", "truncation", "system")


@dataclass(frozen=True)
class Encoding:
    """What a worker needs to turn conversations into examples."""

    tokenizer: Any
    template: str
    train_on: str
    reasoning: str
    max_length: int
    truncation: str


def encode_chunk(convs: list[Conversation], enc: Encoding) -> dict[str, Any]:
    """Examples of ``convs`` as flat arrays, with the per-row counts of ``tokenize_conversations``:
    an example with nothing to train is dropped (``untrainable``); one over ``max_length`` is dropped
    (``too_long``) or cut to it (``truncated``; dropped as too long if nothing trained is left).

    Each conversation is rendered and its trained char regions found (``chat.plan_all``), then the
    texts of the whole chunk are tokenized in one batch and masked as arrays (``chat.finish``):
    the same examples as ``chat.encode_all`` one by one (tests/data/test_source_cache.py)."""
    from sft.data import chat
    from sft.data.render import tokenize_many
    from sft.data.rows import materialize

    convs = materialize(convs)  # rows of a JSONL file are parsed again here, in the worker
    n = len(convs)
    counts = {k: np.zeros(n, np.int32) for k in ("kept", "too_long", "untrainable", "truncated")}
    errors: list[tuple[int, str]] = []
    planned: list[tuple[int, chat.Piece]] = []
    texts: dict[int, list[Any]] = {}  # rows of the `text` format: tokenized as documents, not chats
    for r, conv in enumerate(convs):
        try:
            if conv.is_text:
                texts[r] = chat.encode_all(conv, enc.tokenizer, enc.template, enc.train_on, enc.reasoning)
            else:
                planned += [(r, p) for p in chat.plan_all(conv, enc.tokenizer, enc.template, enc.train_on, enc.reasoning)]
        except SftError as e:
            errors.append((r, str(e).removeprefix(f"{conv.location()}: ")))  # the pipeline prefixes it once
    tokens = iter(tokenize_many(enc.tokenizer, [p[0] for _, p in planned]))
    # (row, ids, trained, turn, merged) in row order
    examples: list[tuple[int, np.ndarray, np.ndarray, int, int]] = []
    for r, piece in planned:
        ids, trained, merged = chat.finish(enc.tokenizer, piece, *next(tokens))
        examples.append((r, ids, trained, -1 if piece[2] is None else piece[2], merged))
    for r, exs in texts.items():
        for ex in exs:
            lab = np.asarray(ex.labels, dtype=np.int64)
            examples.append((r, np.asarray(ex.input_ids, np.int32), lab != IGNORE, -1, 0))
    if texts:
        examples.sort(key=lambda e: e[0])  # stable: a row's examples keep their order
    ids_out: list[np.ndarray] = []
    trained_out: list[np.ndarray] = []
    cols: dict[str, list[int]] = {"lengths": [], "row": [], "turn": [], "merged": [], "truncated": []}
    for r, t, mask, turn, merged in examples:
        if not mask.any():
            counts["untrainable"][r] += 1
            continue
        cut = 0
        if len(t) > enc.max_length:
            if enc.truncation == "drop" or not mask[: enc.max_length].any():
                counts["too_long"][r] += 1
                continue
            t, mask, cut = t[: enc.max_length], mask[: enc.max_length], 1
            counts["truncated"][r] += 1
        counts["kept"][r] += 1
        ids_out.append(t)
        trained_out.append(mask)
        for k, v in (("lengths", len(t)), ("row", r), ("turn", turn), ("merged", merged), ("truncated", cut)):
            cols[k].append(v)
    return {
        "input_ids": np.concatenate(ids_out).astype(np.int32, copy=False) if ids_out else np.zeros(0, np.int32),
        "trained": np.concatenate(trained_out).astype(np.uint8) if trained_out else np.zeros(0, np.uint8),
        **{k: np.asarray(v, dtype=np.int64) for k, v in cols.items()},
        "counts": counts,
        "errors": errors,
    }


# A worker's Encoding and conversations: set in this process right before the pool forks, so every
# worker inherits them (nothing is pickled but the (start, end) of each task and its arrays back).
_WORKER: tuple[Encoding, list[Conversation]] | None = None


def _work(span: tuple[int, int]) -> dict[str, Any]:
    assert _WORKER is not None  # set by encode_source before the fork
    enc, convs = _WORKER
    return encode_chunk(convs[span[0] : span[1]], enc)


@contextmanager
def _single_threaded_tokenizer() -> Iterator[None]:
    """The Rust tokenizer on one thread, here and in workers forked meanwhile (silently: no
    warning at fork). Its threads share one BPE cache behind a lock: on 2 cores one thread
    tokenizes 10k conversations in 3.0 s, two in 4.7 s (bench/RESULTS.md); processes scale."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def num_workers(setting: int | str, rows: int) -> int:
    """Worker processes for ``rows`` conversations: ``data.num_proc`` (``auto`` = usable cores),
    none (this process) when there are too few rows to be worth starting them.

    >>> num_workers(4, 100), num_workers(2, 10_000)
    (1, 2)
    """
    n = usable_cores() if setting == "auto" else int(setting)
    if n < 1:
        raise SftError(f"data.num_proc: {setting!r} must be 'auto' or a number >= 1")
    return max(1, min(n, rows // (4 * CHUNK)))


def encode_source(convs: list[Conversation], enc: Encoding, directory: Path | None, num_proc: int | str,
                  label: str = "source", keep_errors: bool = True) -> TokenStore:
    """Tokenize ``convs`` (one source, reading order) into a store at ``directory`` (None: in memory).
    ``keep_errors=False``: a store with rows that failed to encode is not kept on disk (the run
    stops on them; nothing is cached until they are fixed)."""
    writer = StoreWriter(directory)
    files: dict[str, int] = {}
    row_file = np.asarray([files.setdefault(c.source, len(files)) for c in convs], dtype=np.int32)
    row_line = np.asarray([c.line for c in convs], dtype=np.int64)
    counts = {k: np.zeros(len(convs), np.int32) for k in ("kept", "too_long", "untrainable", "truncated")}
    errors: list[list[Any]] = []
    spans = [(i, min(i + CHUNK, len(convs))) for i in range(0, len(convs), CHUNK)]
    workers = num_workers(num_proc, len(convs))
    progress = Progress(f"tokenize {label}", len(convs))
    global _WORKER
    _WORKER = (enc, convs)
    try:
        with _single_threaded_tokenizer():
            if workers > 1:
                encode_chunk(convs[:1], enc)  # fills the template caches here: every worker inherits them
                gc.freeze()  # a worker's collections then leave the parent's objects (the rows) unwritten: shared, not copied
            with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else nullcontext() as pool:
                results = pool.imap(_work, spans) if pool is not None else map(_work, spans)
                for (start, end), out in zip(spans, results):
                    writer.add(out["input_ids"], out["trained"], out["lengths"], row=out["row"] + start,
                               turn=out["turn"], merged=out["merged"], truncated=out["truncated"])
                    for k, v in out["counts"].items():
                        counts[k][start:end] = v
                    errors += [[start + r, msg] for r, msg in out["errors"]]
                    progress.update(end - start)
    except BaseException:
        writer.abort()
        raise
    finally:
        _WORKER = None
        gc.unfreeze()
    progress.close()
    first = np.concatenate([[0], np.cumsum(counts["kept"], dtype=np.int64)])
    rows: dict[str, np.ndarray] = {"file": row_file, "line": row_line, "first": first, **counts}
    return writer.finish(rows, {"files": list(files), "errors": errors}, keep=keep_errors or not errors)


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_fingerprint(cfg: Config, src: SourceConfig) -> list[Any]:
    """``hub.fingerprint`` with each file's modification time replaced by its sha256: a file
    rewritten with the same content (a fresh checkout, ``touch``) is still a hit."""
    out = []
    for entry in hub.fingerprint(src, resolve_path(cfg, src.path)):
        if isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and os.path.isfile(entry[0]):
            entry = [entry[0], entry[1], _file_digest(entry[0])]
        out.append(entry)
    return out


def code_digest() -> str:
    """sha256 of the modules whose code decides the tokens of a row."""
    from sft.data import chat, formats, masks, sources, store

    h = hashlib.sha256()
    for mod in (chat, masks, formats, sources, hub, store):
        h.update(Path(str(mod.__file__)).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def source_key(cfg: Config, src: SourceConfig, tokenizer_id: dict[str, Any], template: str) -> str:
    """The cache key of one source's store (see the module docstring for what goes in)."""
    settings = {k: v for k, v in asdict(src).items() if k not in ("weight", "metric", "name", "category")}
    body = {
        "v": KEY_VERSION,
        "files": content_fingerprint(cfg, src),
        "source": settings,
        "data": {k: getattr(cfg.data, k) for k in TOKEN_FIELDS},
        "tokenizer": tokenizer_id,
        "template": template,
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def source_store(cfg: Config, src: SourceConfig, convs: list[Conversation], enc: Encoding,
                 tokenizer_id: dict[str, Any], root: Path | None, cacheable: bool) -> TokenStore:
    """The store of ``src``'s valid conversations ``convs``: from ``root/sources/<key>`` when there,
    else tokenized now (and kept there when ``cacheable``); in memory when ``root`` is None."""
    label = src.name or Path(src.path).name
    if root is None:
        return encode_source(convs, enc, None, cfg.data.num_proc, label)
    directory = root / "sources" / source_key(cfg, src, tokenizer_id, enc.template)
    store = TokenStore.open(directory)
    if store is not None and len(store.rows["line"]) == len(convs):
        return store
    return encode_source(convs, enc, directory if cacheable else None, cfg.data.num_proc, label,
                         keep_errors=cfg.data.on_invalid == "skip")
