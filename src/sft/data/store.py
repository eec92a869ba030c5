"""Tokenized examples on disk as flat columns, read through memory maps (``data.cache_dir``).

A store is one folder; it is written whole into a temporary sibling and renamed into place, so a
reader (or a crash) never sees half a store::

    store.json                   {"version", "shards": [[examples, tokens], ...], "extra": {...}}
    rows.<name>.npy              per-row columns (one row = one source conversation)
    00000.input_ids.npy          int32 [T]   the shard's token ids, examples one after the other
    00000.trained.npy            uint8 [T]   1 where the token is trained (its label is itself)
    00000.offsets.npy            int64 [n+1] example k of the shard is tokens offsets[k]:offsets[k+1]
    00000.<name>.npy             per-example columns, [n] each (row, turn, merged, truncated, ntrained:
                                 trained tokens, counted when written: no pass over the tokens needs them)

Labels are a one-byte mask, not int32: every label is IGNORE or the token itself (one convention,
``sft.data.types``), so ``labels = where(trained, input_ids, IGNORE)``; the writer checks it.

Why ``.npy`` + ``numpy.memmap`` rather than Arrow or safetensors: an ``.npy`` file is a short header
and the raw array, so ``np.load(mmap_mode="r")`` maps it with no copy and no parsing, and an
example is two offset reads and a slice; the page cache, not the Python heap, holds the tokens, so
the process's memory does not grow with the data. numpy is already a core dependency (Arrow's
``list<int32>`` is this same offsets + values layout, behind a pyarrow dependency the training path
does not otherwise need), ``allow_pickle=False`` keeps loading safe, and shards are written one at
a time while tokenizing, which a single safetensors file (header first) cannot do.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from sft.data.types import IGNORE, Example
from sft.errors import SftError

STORE_VERSION = 2
SHARD_TOKENS = 16 * 1024 * 1024  # tokens per shard (64 MB of ids): bounds the writer's buffer (x2 while it is joined)
EXAMPLE_COLUMNS = {"row": np.int64, "turn": np.int32, "merged": np.int32, "truncated": np.uint8, "ntrained": np.int32}


def _load(path: Path) -> np.ndarray:
    # a plain ndarray view of the map: np.memmap's subclass hooks cost microseconds per slice
    return np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).
    glibc keeps what a stage freed (a shard's buffer, the arrays of a chunk) in its heap, and the
    next stage's allocations land around it, so without this the resident memory of the data path
    grew by ~1 KB a row over the whole run (measured: 31 MB per 33k-row source, all given back by
    a trim)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def _save_parts(path: Path, parts: list[np.ndarray]) -> None:
    """``np.save`` of the parts joined (1-D, one dtype), written part after part.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x.npy"
    >>> _save_parts(p, [np.arange(3, dtype=np.int32), np.arange(2, dtype=np.int32)])
    >>> np.load(p).tolist()
    [0, 1, 2, 0, 1]
    """
    dtype = parts[0].dtype
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (sum(map(len, parts)),)}
        np.lib.format.write_array_header_1_0(f, header)
        for part in parts:
            f.write(np.ascontiguousarray(part, dtype=dtype).tobytes())


class StoreWriter:
    """Collects encoded chunks and writes them as shards into ``directory`` (or keeps them in
    memory when ``directory`` is None); ``finish`` renames the folder into place."""

    def __init__(self, directory: Path | None, shard_tokens: int = SHARD_TOKENS) -> None:
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.tmp: Path | None = None
        if directory is not None:
            directory.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = directory.parent / f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            self.tmp.mkdir()
        self.buffer: list[dict[str, np.ndarray]] = []
        self.buffered = 0
        self.shards: list[dict[str, np.ndarray]] = []  # in memory, or memory maps once written
        self.counts: list[list[int]] = []

    def add(self, input_ids: np.ndarray, trained: np.ndarray, lengths: np.ndarray, **columns: np.ndarray) -> None:
        """Append examples: ``input_ids``/``trained`` concatenated [T], ``lengths`` [n], columns [n]."""
        if int(lengths.sum()) != len(input_ids) or len(trained) != len(input_ids):
            raise SftError("store: lengths, input_ids and trained disagree (a bug in sft; please report it)")
        mask = trained.astype(np.uint8, copy=False)
        ends = np.cumsum(lengths, dtype=np.int64)
        total = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        columns = {**columns, "ntrained": total[ends] - total[ends - lengths]}  # per example (the chunk is small)
        chunk: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int32, copy=False), "trained": mask,
                 "lengths": lengths.astype(np.int64, copy=False)}
        for name, dtype in EXAMPLE_COLUMNS.items():
            chunk[name] = np.asarray(columns[name], dtype=dtype)
        self.buffer.append(chunk)
        self.buffered += len(input_ids)
        if self.buffered >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        buffer, self.buffer, self.buffered = self.buffer, [], 0
        lengths = np.concatenate([c["lengths"] for c in buffer])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.counts.append([len(lengths), int(offsets[-1])])
        names = [k for k in buffer[0] if k != "lengths"]
        if self.tmp is None:
            self.shards.append({"offsets": offsets, **{k: np.concatenate([c[k] for c in buffer]) for k in names}})
            return
        k = len(self.counts) - 1
        np.save(self.tmp / f"{k:05d}.offsets.npy", offsets, allow_pickle=False)
        for name in names:  # chunk after chunk into the file: the shard is never joined in memory (x2)
            _save_parts(self.tmp / f"{k:05d}.{name}.npy", [c[name] for c in buffer])
        del buffer
        return_freed_memory()

    def finish(self, rows: dict[str, np.ndarray], extra: dict[str, Any], keep: bool = True) -> TokenStore:
        """Write the last shard, the per-row columns and ``store.json``; return the store.
        ``keep=False``: read what was written into memory and leave nothing on disk."""
        self._flush()
        body = {"version": STORE_VERSION, "shards": self.counts, "rows": sorted(rows), "extra": extra}
        if self.tmp is None or self.directory is None:
            return TokenStore(None, body, self.shards, {k: np.asarray(v) for k, v in rows.items()})
        if not keep:
            names = ["input_ids", "trained", "offsets", *EXAMPLE_COLUMNS]
            shards = [{n: np.load(self.tmp / f"{k:05d}.{n}.npy", allow_pickle=False) for n in names}
                      for k in range(len(self.counts))]
            self.abort()
            return TokenStore(None, body, shards, {k: np.asarray(v) for k, v in rows.items()})
        for name, arr in rows.items():
            np.save(self.tmp / f"rows.{name}.npy", np.asarray(arr), allow_pickle=False)
        (self.tmp / "store.json").write_text(json.dumps(body), encoding="utf-8")  # last: marks it complete
        try:
            os.rename(self.tmp, self.directory)
        except OSError:  # another process wrote the same store first: theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)
        store = TokenStore.open(self.directory)
        if store is None:
            raise SftError(f"{self.directory}: the tokenized-data store could not be read back; check the disk")
        return store

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class TokenStore:
    """A written store: shards of memory-mapped columns plus small per-row columns."""

    def __init__(self, directory: Path | None, body: dict[str, Any], shards: list[dict[str, np.ndarray]],
                 rows: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.extra: dict[str, Any] = body["extra"]
        self.shards = shards
        self.rows = rows
        # example index where each shard starts: one searchsorted finds an example's shard
        self.starts = np.concatenate([[0], np.cumsum([n for n, _ in body["shards"]])]).astype(np.int64)
        self.lengths = np.concatenate([np.diff(s["offsets"]) for s in shards]) if shards else np.zeros(0, np.int64)

    @classmethod
    def open(cls, directory: Path) -> TokenStore | None:
        """The store in ``directory``, or None when it is missing, incomplete or damaged."""
        try:
            body = json.loads((directory / "store.json").read_text(encoding="utf-8"))
            if body.get("version") != STORE_VERSION:
                return None
            names = ["input_ids", "trained", "offsets", *EXAMPLE_COLUMNS]
            shards = [{n: _load(directory / f"{k:05d}.{n}.npy") for n in names} for k in range(len(body["shards"]))]
            rows = {n: _load(directory / f"rows.{n}.npy") for n in body["rows"]}
        except (OSError, ValueError, KeyError):
            return None  # rebuilt, not trusted
        for (n, t), s in zip(body["shards"], shards):
            if len(s["offsets"]) != n + 1 or len(s["input_ids"]) != t or len(s["trained"]) != t:
                return None
        return cls(directory, body, shards, rows)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        """(shard, index in the shard) of example ``i``."""
        if len(self.shards) == 1:
            return self.shards[0], i
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shards[s], i - int(self.starts[s])

    def tokens(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, trained) of shard ``s``, through maps of their own (closed when dropped)."""
        if self.directory is None:
            return self.shards[s]["input_ids"], self.shards[s]["trained"]
        return _load(self.directory / f"{s:05d}.input_ids.npy"), _load(self.directory / f"{s:05d}.trained.npy")

    def column(self, name: str) -> np.ndarray:
        """A per-example column of every shard, concatenated ([n] small ints; not the tokens)."""
        if not self.shards:
            return np.zeros(0, EXAMPLE_COLUMNS[name])
        return np.concatenate([s[name] for s in self.shards])

    def trained_counts(self) -> np.ndarray:
        """Trained tokens of every example, [n] int64 (counted when the store was written: reading
        them touches no token page)."""
        return self.column("ntrained").astype(np.int64)


class Examples(Sequence[Example]):
    """Examples picked from stores by index arrays: ``self[i]`` is store ``which[i]``'s example
    ``index[i]``, read from the memory maps when asked (one example's lists at a time).

    ``files[k]``: store k's file labels, by the per-row ``file`` column; lines from ``line``.
    """

    def __init__(self, stores: list[TokenStore], which: np.ndarray, index: np.ndarray) -> None:
        self.stores = stores
        self.which = np.asarray(which, dtype=np.int32)
        self.positions = np.asarray(index, dtype=np.int64)
        per_store = [s.lengths for s in stores]
        self.lengths = np.zeros(len(self.positions), np.int64)  # [N] tokens per example
        for k, lens in enumerate(per_store):
            pick = self.which == k
            self.lengths[pick] = lens[self.positions[pick]]

    def __len__(self) -> int:
        return len(self.positions)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        store = self.stores[self.which[i]]
        shard, j = store.locate(int(self.positions[i]))
        a, b = shard["offsets"][j : j + 2].tolist()
        ids = shard["input_ids"][a:b]
        labels = np.where(shard["trained"][a:b] != 0, ids, IGNORE).tolist()
        row, turn, merged = shard["row"][j].item(), shard["turn"][j].item(), shard["merged"][j].item()
        meta: dict[str, Any] = {}
        if turn >= 0:
            meta["turn"] = turn
        if merged:
            meta["merged_starts"] = merged
        files: list[str] = store.extra["files"]
        return Example(ids.tolist(), labels, files[store.rows["file"][row].item()], store.rows["line"][row].item(),
                       bool(shard["truncated"][j]), meta)

    def __iter__(self) -> Iterator[Example]:
        for i in range(len(self)):
            yield self[i]

    def keep(self, mask: np.ndarray) -> Examples:
        """The examples where ``mask`` is true, in order."""
        return Examples(self.stores, self.which[mask], self.positions[mask])

    def trained_counts(self) -> np.ndarray:
        """Trained tokens per example, [N]."""
        out = np.zeros(len(self), np.int64)
        for k, store in enumerate(self.stores):
            pick = self.which == k
            if pick.any():
                out[pick] = store.trained_counts()[self.positions[pick]]
        return out

    def scan(self, bos: int | None, eot: int | None) -> dict[str, np.ndarray]:
        """Per example, bool [N]: ``zero`` (nothing trained), ``no_eot`` (something trained, but no
        ``eot`` token; all False when ``eot`` is None), ``double_bos`` (starts with two ``bos``) and
        ``merged``: what ``chat.lint`` checks, without making an ``Example`` of each. The tokens are
        read shard by shard through maps opened for this pass only, so their pages do not stay in
        this process (a million examples are ~1 GB of ids and masks)."""
        out = {k: np.zeros(len(self), dtype=bool) for k in ("zero", "no_eot", "double_bos", "merged")}
        for k, store in enumerate(self.stores):
            pick = np.flatnonzero(self.which == k)
            if not len(pick):
                continue
            flags = {name: np.zeros(len(store), dtype=bool) for name in out}
            for s, shard in enumerate(store.shards):
                a, b = int(store.starts[s]), int(store.starts[s + 1])
                offsets = np.asarray(shard["offsets"])
                ids, mask = store.tokens(s)
                trained = np.asarray(shard["ntrained"]) > 0
                flags["zero"][a:b] = ~trained
                flags["merged"][a:b] = np.asarray(shard["merged"]) != 0
                n = np.diff(offsets)
                if eot is not None and len(ids):
                    some = n > 0  # (reduceat sums [start, next start): skip empty examples' starts)
                    hits = np.zeros(len(n), np.int64)
                    hits[some] = np.add.reduceat((ids == eot) & (mask != 0), offsets[:-1][some], dtype=np.int64)
                    flags["no_eot"][a:b] = trained & (hits == 0)
                if bos is not None and len(ids):
                    two = n >= 2
                    first = offsets[:-1][two]
                    flags["double_bos"][a:b][two] = (ids[first] == bos) & (ids[first + 1] == bos)
                del ids, mask
            for name in out:
                out[name][pick] = flags[name][self.positions[pick]]
        return out

    def per_example(self, name: str) -> np.ndarray:
        """A per-example column (e.g. ``truncated``) or per-row one (``file``, ``line``), [N]."""
        out = np.zeros(len(self), np.int64)
        for k, store in enumerate(self.stores):
            pick = self.which == k
            if not pick.any():
                continue
            if name in EXAMPLE_COLUMNS:
                out[pick] = store.column(name)[self.positions[pick]]
            else:
                out[pick] = np.asarray(store.rows[name])[store.column("row")[self.positions[pick]]]
        return out


    def file_labels(self) -> list[str]:
        """The file (source label) of every example, [N] (the same few string objects)."""
        out: list[str] = [""] * len(self)
        rows = [store.column("row") for store in self.stores]
        for i, (k, j) in enumerate(zip(self.which.tolist(), self.positions.tolist())):
            store = self.stores[k]
            out[i] = store.extra["files"][int(store.rows["file"][rows[k][j]])]
        return out


def example_lengths(examples: Sequence[Example]) -> np.ndarray:
    """Tokens per example, int64 [n], read from the store's offsets when the examples live in one.

    >>> example_lengths([Example([1, 2, 3], [-100, 2, 3])]).tolist()
    [3]
    """
    if isinstance(examples, Examples):
        return examples.lengths
    return np.asarray([len(e) for e in examples], dtype=np.int64)
