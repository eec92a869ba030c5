"""Config -> conversations -> tokenized examples: the data path the training loop calls.

``load_conversations`` reads every source, validates every row (collecting all problems), mixes
sources by ``weight``/``limit``, counts (and with ``data.dedup`` removes) exact duplicates and
holds out ``eval.split``. ``build_dataset`` tokenizes with ``chat.encode``, applies
``data.max_length``/``data.truncation`` into one token store per source (``sft.data.store``,
``sft.data.source_cache``: memory-mapped numpy columns, keyed by the source's content), then picks
the split's examples from those stores by index. The pick (index arrays, report, quality findings)
is cached too, keyed on the input files' path/size/mtime and every setting that changes it, so a
warm start reads no row and holds no token in Python lists.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sft.config import Config, SourceConfig, cache_root, resolve_path
from sft.data import hub
from sft.data.formats import KEYS_HINT, conversation_key, detect_format, parse_row
from sft.data.overlap import NEAR_DUPLICATE_THRESHOLD
from sft.data.picks import Raw, count_examples, load_cache, row_columns, save_cache, select_examples
from sft.data.progress import Progress
from sft.data.report import MAX_LISTED, DataReport, Dataset, SourceStats
from sft.data.rows import Row, RowReader, Spill, row_reader
from sft.data.sources import mix_counts, sample_rows
from sft.data.split import Holdout, hold_out_rows
from sft.data.store import return_freed_memory
from sft.data.types import IGNORE, Conversation, Example
from sft.errors import SftError

CACHE_VERSION = 2
__all__ = ["DataReport", "Dataset", "SourceStats", "build_dataset", "collect_conversations", "hold_out",
           "lint_dataset", "load_cache", "load_conversations", "save_cache", "select_examples",
           "tokenize_conversations"]


# ---------------------------------------------------------------------------------------------
# reading and validating


def _read_source(cfg: Config, src: SourceConfig, report: DataReport) -> tuple[list[Conversation], np.ndarray]:
    """Valid conversations of one source (up to ``limit``) and their ``row_keys``; problems go into
    ``report``. Rows of JSON Lines files are kept as ``sft.data.rows.Row`` (where they are, not
    their text: the memory of reading does not grow with the text)."""
    path = resolve_path(cfg, src.path)
    stats = SourceStats(name=src.name or path.name, path=str(path))
    report.sources.append(stats)
    forced: str = src.format if src.format != "auto" else cfg.data.format
    out: list[Conversation] = []
    keys = bytearray()  # 16 bytes a row: row_keys
    formats: list[str] = []
    mapping = hub.column_mapping(src)
    progress = Progress(f"read {stats.name}", None)  # rows stream in: no total, no ETA
    spill: Spill | None = None  # rows not re-readable where they are go here (sft.data.rows)
    for file, records in hub.iter_source(src, path):  # files, Arrow shards, or a `datasets` split
        fmt: str | None = None if forced == "auto" else forced
        reader: RowReader | None = None
        spilled: RowReader | None = None
        for rec in records:
            if src.limit is not None and len(out) >= src.limit:
                break
            value, problems = (None, [rec.error]) if rec.error else hub.map_columns(rec.value, mapping)
            conv = None
            if not problems:
                fmt = fmt or detect_format(value)
                if fmt is None:
                    keys_ = sorted(value) if isinstance(value, dict) else type(value).__name__
                    problems = [f"row keys are {keys_}; {KEYS_HINT}"]
                else:
                    conv, problems = parse_row(value, fmt, cfg.data.system)
            stats.rows += 1
            progress.update(1)
            if conv is None:
                stats.invalid += 1
                for p in problems:
                    report.add_problem(str(file), rec.line, p)
                continue
            stats.valid += 1
            conv.source, conv.line, conv.metric = str(file), rec.line, src.metric
            conv.category = conv.category or src.category  # a row's own category wins
            keys += _row_key(conv)
            if rec.offset >= 0 and fmt is not None:  # a JSON Lines row: kept as where it is
                if reader is None:
                    reader = row_reader(str(file), fmt, mapping, cfg.data.system, src.metric, src.category)
                conv = Row(conv, rec.offset, reader)
            elif fmt is not None:  # any other row: kept in the spill file
                spill = spill or Spill(cache_root() / "rows")  # beside the caches, not in data.cache_dir
                at = spill.add(rec.value)
                if at is not None:
                    if spilled is None:
                        spilled = row_reader(str(file), fmt, mapping, cfg.data.system, src.metric, src.category, spill)
                    conv = Row(conv, at, spilled)
            out.append(conv)
        if (fmt or forced) not in formats:
            formats.append(fmt or forced)
    stats.format = "+".join(formats)
    progress.close()
    if spill is not None:
        spill.close()
    return out, np.frombuffer(bytes(keys), dtype=np.uint64).reshape(-1, 2)


def _row_key(conv: Conversation) -> bytes:
    """16-byte digest of ``conversation_key``: equal for exact duplicates (a million rows' keys
    take 16 MB; the keys themselves are the rows' whole text)."""
    return hashlib.blake2b(conversation_key(conv).encode(), digest_size=16).digest()


def repeats(keys: np.ndarray) -> np.ndarray:
    """Rows whose key (uint64 [n, 2]) an earlier row has, bool [n].

    >>> repeats(np.array([[1, 2], [3, 4], [1, 2], [1, 5]], dtype=np.uint64)).tolist()
    [False, False, True, False]
    """
    if not len(keys):
        return np.zeros(0, dtype=bool)
    order = np.lexsort((np.arange(len(keys)), keys[:, 1], keys[:, 0]))  # by key, then reading order
    k = keys[order]
    same = np.r_[False, (k[1:] == k[:-1]).all(axis=1)]
    out = np.zeros(len(keys), dtype=bool)
    out[order[same]] = True
    return out


def _read_all(cfg: Config, sources: list[SourceConfig], report: DataReport,
              raw: Raw | None = None) -> list[list[Conversation]]:
    """Valid conversations of each source, duplicates counted (and with data.dedup removed);
    ``raw`` receives each source with all its valid rows (what its token store holds)."""
    read = [_read_source(cfg, s, report) for s in sources]
    per_source = [convs for convs, _ in read]
    if raw is not None:
        raw += [(s, list(convs)) for s, convs in zip(sources, per_source)]
    report.rows = sum(s.rows for s in report.sources)
    report.valid = sum(s.valid for s in report.sources)
    report.invalid_rows = sum(s.invalid for s in report.sources)
    if cfg.data.on_invalid == "skip":
        report.skipped = report.invalid_rows
    dup = repeats(np.concatenate([k for _, k in read])) if read else np.zeros(0, dtype=bool)
    report.duplicates += int(dup.sum())
    if cfg.data.dedup and dup.any():
        report.deduplicated += int(dup.sum())
        at = 0
        for i, convs in enumerate(per_source):
            flags = dup[at : at + len(convs)].tolist()
            at += len(convs)
            per_source[i] = [c for c, d in zip(convs, flags) if not d]
    return per_source


def _mix(sources: list[SourceConfig], per_source: list[list[Conversation]], stats: list[SourceStats],
         seed: int) -> list[Conversation]:
    """The weighted, limited mixture (``weight`` samples with replacement: rows may repeat)."""
    counts = mix_counts([len(c) for c in per_source], [s.weight for s in sources])
    rng = random.Random(seed)
    mixed: list[Conversation] = []
    for st, convs, k in zip(stats, per_source, counts):
        picked = [convs[j] for j in sample_rows(len(convs), k, rng)]
        st.used = len(picked)
        mixed += picked
    return mixed


def hold_out(
    per_source: list[list[Conversation]], fraction: float, seed: int, threshold: float = NEAR_DUPLICATE_THRESHOLD
) -> tuple[list[list[Conversation]], list[Conversation], Holdout]:
    """Split each source's rows into (kept for training, held out for eval) BEFORE any weighting.

    The hold-out is drawn over groups of exact and near-duplicate conversations, and no held-out
    prompt or reply overlaps a training row (``sft.data.split``): weighting, which repeats rows,
    then only ever repeats training rows, and no conversation is both trained on and evaluated.
    """
    if fraction <= 0:  # nothing held out: no pass over the rows
        return per_source, [], Holdout([False] * sum(map(len, per_source)))
    flat = [c for convs in per_source for c in convs]
    split = hold_out_rows(flat, fraction, seed, threshold)
    flags = iter(split.held)
    sides = [[next(flags) for _ in convs] for convs in per_source]
    kept = [[c for c, h in zip(convs, hs) if not h] for convs, hs in zip(per_source, sides)]
    held = [c for convs, hs in zip(per_source, sides) for c, h in zip(convs, hs) if h]
    return kept, held, split


def dev_fraction(split: float, dev_split: float) -> float:
    """``eval.dev_split`` is a share of all training rows; the dev hold-out draws from what the
    eval hold-out left, so it takes this share of those.

    >>> dev_fraction(0.5, 0.25), dev_fraction(0.0, 0.05)
    (0.5, 0.05)
    """
    return dev_split / (1.0 - split) if dev_split else 0.0


def collect_conversations(cfg: Config, split: str = "train") -> tuple[list[Conversation], DataReport]:
    """Like ``load_conversations`` but never raises for invalid rows: they are in the report."""
    convs, report, _ = _collect(cfg, split)
    return convs, report


def _collect(cfg: Config, split: str) -> tuple[list[Conversation], DataReport, Raw]:
    if split not in ("train", "eval", "dev"):
        raise SftError(f"split {split!r} is unknown; use 'train', 'eval' or 'dev'")
    own = {"train": [], "eval": cfg.eval.data, "dev": cfg.eval.dev}[split]  # the split's own files
    if not cfg.data.train and (split == "train" or not own):
        raise SftError("data.train: no training data; add a file, e.g. data: {train: [data/train.jsonl]}")
    report = DataReport(split=split)
    seed = cfg.train.seed
    raw: Raw = []
    held_from_train = split == "train" or cfg.eval.split or (split == "dev" and cfg.eval.dev_split)
    per_source = _read_all(cfg, cfg.data.train, report, raw) if held_from_train else []
    # eval.split first, then eval.dev_split from what is left (the same group-aware split), then weighting
    threshold = cfg.data.quality.near_duplicate_threshold
    kept, held, groups = hold_out(per_source, cfg.eval.split, seed, threshold)
    kept, dev_held, _ = hold_out(kept, dev_fraction(cfg.eval.split, cfg.eval.dev_split), seed, threshold)
    if split == "train":
        convs = _mix(cfg.data.train, kept, report.sources, seed)
        report.held_out = len(held)
        report.dev_held_out = len(dev_held)
        report.held_out_groups, report.held_out_kept = groups.groups, groups.kept_overlapping
    else:
        convs = held if split == "eval" else dev_held
        if own:
            n = len(report.sources)
            convs += _mix(own, _read_all(cfg, own, report, raw), report.sources[n:], seed)
    report.conversations = len(convs)
    return convs, report, raw


def invalid_error(report: DataReport) -> SftError:
    """The error listing the problems of a report (the first MAX_LISTED of them)."""
    lines = report.problems()
    shown = lines[:MAX_LISTED]
    more = f"\n... and {len(lines) - MAX_LISTED} more (`sft data check CONFIG --json` lists all)" if len(lines) > MAX_LISTED else ""
    return SftError(
        f"{report.invalid_rows} invalid row(s) in the {report.split} data:\n"
        + "\n".join(shown)
        + more
        + "\nfix them, or set data.on_invalid: skip to drop them (they are counted in the report)"
    )


def load_conversations(cfg: Config, split: str = "train") -> tuple[list[Conversation], DataReport]:
    """Validated conversations of ``split`` ("train" minus the eval.split holdout, or "eval":
    eval.data plus the holdout). Raises SftError listing every problem when rows are invalid
    and ``data.on_invalid`` is ``error``."""
    convs, report = collect_conversations(cfg, split)
    if report.invalid and cfg.data.on_invalid == "error":
        raise invalid_error(report)
    return convs, report


# ---------------------------------------------------------------------------------------------
# tokenizing


def truncate_example(ex: Example, max_length: int) -> Example:
    """Keep the first ``max_length`` tokens (the prompt's start survives).

    >>> truncate_example(Example([1, 2, 3, 4], [-100, -100, 3, 4]), 3).labels
    [-100, -100, 3]
    """
    return Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.source, ex.line, True, dict(ex.meta))


def tokenize_conversations(
    convs: list[Conversation], tokenizer: Any, template: str, cfg: Config, report: DataReport
) -> list[Example]:
    """Encode, then drop or truncate by length; every dropped row is counted in ``report``."""
    from sft.data import chat  # written beside this module; imported late so IO works without it

    out = []
    encoded: list[Example] = []
    for conv in convs:
        try:  # usually one example; one per trained turn where the template rewrites history
            encoded += chat.encode_all(conv, tokenizer, template, cfg.data.train_on, cfg.data.reasoning)
        except SftError as e:
            error = str(e).removeprefix(f"{conv.location()}: ")  # the location is printed once
            report.unrenderable(conv.source, conv.line, error, skip=cfg.data.on_invalid == "skip")
            continue
    for ex in encoded:
        if ex.num_trained == 0:
            report.dropped_untrainable += 1
            continue
        if len(ex) > cfg.data.max_length:
            if cfg.data.truncation == "drop":
                report.dropped_too_long += 1
                continue
            ex = truncate_example(ex, cfg.data.max_length)
            if ex.num_trained == 0:  # nothing left to train on: drop rather than keep a dead row
                report.dropped_too_long += 1
                continue
            report.truncated += 1
        out.append(ex)
    report.examples = len(out)
    report.lengths = [len(e) for e in out]
    report.total_tokens = sum(report.lengths)
    report.trained_tokens = sum(e.num_trained for e in out)
    return out


# ---------------------------------------------------------------------------------------------
# cache: <cache_dir>/sources/<source key>/ (token stores) and <cache_dir>/<key>/ (the split's pick)


def cache_dir(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return resolve_path(cfg, cfg.data.cache_dir)
    return cache_root() / "data"


def _tokenizer_id(tokenizer: Any) -> dict[str, Any]:
    return {
        "class": type(tokenizer).__name__,
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "size": len(tokenizer),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
    }


def cache_key(cfg: Config, tokenizer: Any, template: str, split: str) -> str:
    """A hash of everything that changes the split's examples: input files (path, size, mtime),
    sources, data settings, seed and split, the tokenizer, the template and the code."""
    files = []
    sources = cfg.data.train + cfg.eval.data + cfg.eval.dev  # eval files change the train split's contamination findings
    for src in sources:
        files += hub.fingerprint(src, resolve_path(cfg, src.path))  # files: path, size, mtime
    code = b""
    from sft.data import (
        chat,
        formats,
        masks,
        minhash,
        overlap,
        picks,
        quality,
        quality_cache,
        replies,
        report,
        source_cache,
        store,
    )
    from sft.data import sources as sources_mod
    from sft.data import split as split_mod  # decides the eval.split rows

    for mod in (chat, masks, formats, sources_mod, hub, minhash, overlap, quality, quality_cache, replies, source_cache,
                store, picks, report, split_mod):
        code += Path(str(mod.__file__)).read_bytes()  # quality findings are cached with the train split
    code += Path(__file__).read_bytes()
    body = {
        "v": CACHE_VERSION,
        "split": split,
        "files": files,
        "sources": [asdict(s) for s in sources],
        "data": {k: v for k, v in asdict(cfg.data).items() if k not in ("train", "cache_dir", "packing", "select", "num_proc")},
        "eval_split": cfg.eval.split,
        "dev_split": cfg.eval.dev_split,
        "seed": cfg.train.seed,
        "tokenizer": _tokenizer_id(tokenizer),
        "template": template,
        "code": hashlib.sha256(code).hexdigest(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def apply_quality(cfg: Config, ds: Dataset, convs: list[Conversation], raw: Raw, root: Path | None = None) -> None:
    """Find the quality problems of the train split (``sft.data.quality``; per-source parts cached
    under ``root``, ``sft.data.quality_cache``), count them in the report and remove the rows of
    the kinds in ``data.quality.drop`` from ``ds.examples``. What it needs per row (trained tokens,
    cut at max_length) comes from the stores as arrays indexed by (source, row)."""
    from sft.data import quality, quality_cache

    q = cfg.data.quality
    evals = collect_conversations(cfg, "eval")[0] if (cfg.eval.data or cfg.eval.split) else []
    ex = ds.examples
    tokens, cut = row_columns(ex, [len(rows) for _, rows in raw])
    settings = quality.QualitySettings(q.near_duplicate_threshold, tuple(q.boilerplate))
    ds.quality = quality_cache.find_problems_cached(cfg, convs, evals, settings, raw, root, tokens, cut)
    r = ds.report
    r.quality_counts = quality.counts(ds.quality)
    drop = quality.rows_to_drop(ds.quality, q.drop)
    if not drop:
        return
    r.quality_dropped = {k: 0 for k in q.drop}
    for kind in drop.values():
        r.quality_dropped[kind] += 1
    files, lines = ex.file_labels(), ex.per_example("line").tolist()
    ds.examples = ex.keep(np.fromiter(((f, n) not in drop for f, n in zip(files, lines)), dtype=bool, count=len(ex)))
    count_examples(r, ds.examples)


def _say_dropped(report: DataReport, strict: bool) -> None:
    if strict and report.quality_dropped:  # training says it; `sft data check` shows it in its table
        kinds = ", ".join(f"{k} {n}" for k, n in report.quality_dropped.items())
        print(f"data.quality.drop: removed {sum(report.quality_dropped.values())} rows ({kinds})", file=sys.stderr)


def build_dataset(
    cfg: Config, tokenizer: Any, split: str = "train", *, strict: bool = True, use_cache: bool = True
) -> Dataset:
    """Tokenized examples of ``split``, truncated/dropped by length, deduplicated, cached.

    ``strict=False`` (used by ``sft data check``) reports invalid rows instead of raising.
    ``use_cache=False`` keeps the token stores in memory and writes nothing.
    """
    from sft.data import chat
    from sft.data.source_cache import Encoding, source_store

    template = chat.config_template(cfg, tokenizer)
    root = cache_dir(cfg) if use_cache else None
    path = root / cache_key(cfg, tokenizer, template, split) if root is not None else None
    if path is not None:
        cached = load_cache(path)
        if cached is not None and (not strict or not cached.report.invalid or cfg.data.on_invalid == "skip"):
            _say_dropped(cached.report, strict)
            return _select(cfg, cached, tokenizer) if split == "train" else cached
    convs, report, raw = _collect(cfg, split)
    if strict and report.invalid and cfg.data.on_invalid == "error":
        raise invalid_error(report)
    cacheable = not report.invalid or cfg.data.on_invalid == "skip"  # never cache what must be fixed
    d = cfg.data
    enc = Encoding(tokenizer, template, d.train_on, d.reasoning, d.max_length, d.truncation)
    tid = _tokenizer_id(tokenizer)
    stores = [source_store(cfg, src, rows, enc, tid, root, cacheable) for src, rows in raw]
    examples = select_examples(convs, raw, stores, cfg, report)
    if strict and report.invalid and cfg.data.on_invalid == "error":
        raise invalid_error(report)
    ds = Dataset(examples, report, template)
    if split == "train":
        apply_quality(cfg, ds, convs, raw, root if cacheable else None)  # never cache what must be fixed
        return_freed_memory()  # what the quality stage freed: the lint pass and training come next
        _say_dropped(report, strict)
        try:
            ds.lint = chat.lint(tokenizer, template, ds.examples)
        except SftError:  # left to the callers of lint_dataset, as before the cache held it
            ds.lint = None
    if path is not None and (not report.invalid or cfg.data.on_invalid == "skip"):
        save_cache(path, ds)  # before data.select: the scores are read afresh on each load
    return _select(cfg, ds, tokenizer) if split == "train" else ds


def _select(cfg: Config, ds: Dataset, tokenizer: Any) -> Dataset:
    """``data.select``: keep the rows the model scores pick (sft.data.select)."""
    if cfg.data.select is None:
        return ds
    import numpy as np

    from sft.data.select import apply_select

    ex = ds.examples  # apply_select reads (source, line) only: hand it those, not the tokens
    locs = [_Loc(s, n, i) for i, (s, n) in enumerate(zip(ex.file_labels(), ex.per_example("line").tolist()))]
    kept, ds.report.select = apply_select(cfg, locs, tokenizer)
    mask = np.zeros(len(ex), dtype=bool)
    mask[[loc.i for loc in kept]] = True
    ds.examples = ex.keep(mask)
    ds.lint = None  # it covered the rows before data.select
    count_examples(ds.report, ds.examples)
    return ds


def lint_dataset(ds: Dataset, tokenizer: Any) -> list[str]:
    """``sft.data.chat.lint`` of the split's template and examples: cached with the train split."""
    if ds.lint is None:
        from sft.data.chat import lint

        ds.lint = lint(tokenizer, ds.template, ds.examples)
    return ds.lint


@dataclass
class _Loc:
    source: str
    line: int
    i: int  # index in the split's examples


def labels_ok(ex: Example) -> bool:
    """Labels are aligned with input_ids: each is IGNORE or the token itself.

    >>> labels_ok(Example([5, 6], [-100, 6])), labels_ok(Example([5, 6], [-100, 7]))
    (True, False)
    """
    return len(ex.labels) == len(ex.input_ids) and all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels))
