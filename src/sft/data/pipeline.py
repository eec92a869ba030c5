"""Config -> conversations -> tokenized examples: the data path the training loop calls.

``load_conversations`` reads every source, validates every row (collecting all problems), mixes
sources by ``weight``/``limit``, counts (and with ``data.dedup`` removes) exact duplicates and
holds out ``eval.split``. ``build_dataset`` tokenizes with ``chat.encode``, applies
``data.max_length``/``data.truncation`` and caches the result as safetensors + JSON (never pickle),
keyed on the input files' path/size/mtime and every setting that changes the tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sft.config import Config, SourceConfig, cache_root, resolve_path
from sft.data import hub
from sft.data.formats import KEYS_HINT, conversation_key, detect_format, parse_row
from sft.data.overlap import NEAR_DUPLICATE_THRESHOLD
from sft.data.sources import mix_counts, sample_rows
from sft.data.split import Holdout, hold_out_rows
from sft.data.types import IGNORE, Conversation, Example
from sft.errors import SftError

CACHE_VERSION = 1
MAX_LISTED = 50  # problems spelled out in an SftError; `sft data check --json` lists them all


@dataclass
class SourceStats:
    name: str
    path: str
    format: str = "auto"
    rows: int = 0  # rows read (valid + invalid)
    valid: int = 0
    invalid: int = 0  # rows with at least one problem
    used: int = 0  # rows after limit, dedup and weighting


@dataclass
class DataReport:
    """Every count of what happened to the rows; nothing is dropped without being counted here."""

    split: str = "train"
    rows: int = 0
    valid: int = 0
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"file", "line", "error"}
    invalid_rows: int = 0
    skipped: int = 0  # invalid rows dropped because data.on_invalid is skip
    duplicates: int = 0  # rows that repeat an earlier row exactly
    deduplicated: int = 0  # duplicates removed (data.dedup)
    held_out: int = 0  # training rows moved to the eval split (eval.split)
    dev_held_out: int = 0  # training rows moved to the dev split (eval.dev_split)
    held_out_groups: int = 0  # near-duplicate groups (2+ distinct rows) moved to the eval split whole
    held_out_kept: int = 0  # rows drawn for the eval split but kept: their prompt or reply overlaps a training row
    conversations: int = 0  # conversations handed on (after limit, weight, dedup, split)
    examples: int = 0  # tokenized examples kept
    dropped_too_long: int = 0
    dropped_untrainable: int = 0  # no token left to train on (e.g. every turn has train: false)
    truncated: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens per kept example, input order
    sources: list[SourceStats] = field(default_factory=list)
    quality_counts: dict[str, int] = field(default_factory=dict)  # findings per kind (sft.data.quality)
    quality_dropped: dict[str, int] = field(default_factory=dict)  # rows removed per kind (data.quality.drop)
    select: dict[str, Any] = field(default_factory=dict)  # what data.select kept and dropped (sft.data.select)
    cached: bool = False

    @property
    def trained_token_fraction(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    def add_problem(self, file: str, line: int, error: str) -> None:
        self.invalid.append({"file": file, "line": line, "error": error})

    def problems(self) -> list[str]:
        """``FILE:LINE: error`` lines, in reading order."""
        return [f"{p['file']}:{p['line']}: {p['error']}" for p in self.invalid]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("lengths")
        out["trained_token_fraction"] = round(self.trained_token_fraction, 6)
        return out


@dataclass
class Dataset:
    examples: list[Example]
    report: DataReport
    template: str  # the resolved Jinja source used (saved with the model)
    quality: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # train split: sft.data.quality findings


# ---------------------------------------------------------------------------------------------
# reading and validating


def _read_source(cfg: Config, src: SourceConfig, report: DataReport) -> list[Conversation]:
    """Valid conversations of one source (up to ``limit``); problems go into ``report``."""
    path = resolve_path(cfg, src.path)
    stats = SourceStats(name=src.name or path.name, path=str(path))
    report.sources.append(stats)
    forced: str = src.format if src.format != "auto" else cfg.data.format
    out: list[Conversation] = []
    formats: list[str] = []
    mapping = hub.column_mapping(src)
    for file, records in hub.iter_source(src, path):  # files, Arrow shards, or a `datasets` split
        fmt: str | None = None if forced == "auto" else forced
        for rec in records:
            if src.limit is not None and len(out) >= src.limit:
                break
            value, problems = (None, [rec.error]) if rec.error else hub.map_columns(rec.value, mapping)
            conv = None
            if not problems:
                fmt = fmt or detect_format(value)
                if fmt is None:
                    keys = sorted(value) if isinstance(value, dict) else type(value).__name__
                    problems = [f"row keys are {keys}; {KEYS_HINT}"]
                else:
                    conv, problems = parse_row(value, fmt, cfg.data.system)
            stats.rows += 1
            if conv is None:
                stats.invalid += 1
                for p in problems:
                    report.add_problem(str(file), rec.line, p)
                continue
            stats.valid += 1
            conv.source, conv.line, conv.metric = str(file), rec.line, src.metric
            conv.category = conv.category or src.category  # a row's own category wins
            out.append(conv)
        if (fmt or forced) not in formats:
            formats.append(fmt or forced)
    stats.format = "+".join(formats)
    return out


def _read_all(cfg: Config, sources: list[SourceConfig], report: DataReport) -> list[list[Conversation]]:
    """Valid conversations of each source, duplicates counted (and with data.dedup removed)."""
    per_source = [_read_source(cfg, s, report) for s in sources]
    report.rows = sum(s.rows for s in report.sources)
    report.valid = sum(s.valid for s in report.sources)
    report.invalid_rows = sum(s.invalid for s in report.sources)
    if cfg.data.on_invalid == "skip":
        report.skipped = report.invalid_rows
    seen: set[str] = set()
    for i, convs in enumerate(per_source):
        kept = []
        for conv in convs:
            key = conversation_key(conv)
            if key in seen:
                report.duplicates += 1
                if cfg.data.dedup:
                    report.deduplicated += 1
                    continue
            seen.add(key)
            kept.append(conv)
        per_source[i] = kept
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

    >>> dev_fraction(0.1, 0.09), dev_fraction(0.0, 0.05)
    (0.1, 0.05)
    """
    return dev_split / (1.0 - split) if dev_split else 0.0


def collect_conversations(cfg: Config, split: str = "train") -> tuple[list[Conversation], DataReport]:
    """Like ``load_conversations`` but never raises for invalid rows: they are in the report."""
    if split not in ("train", "eval", "dev"):
        raise SftError(f"split {split!r} is unknown; use 'train', 'eval' or 'dev'")
    own = {"train": [], "eval": cfg.eval.data, "dev": cfg.eval.dev}[split]  # the split's own files
    if not cfg.data.train and (split == "train" or not own):
        raise SftError("data.train: no training data; add a file, e.g. data: {train: [data/train.jsonl]}")
    report = DataReport(split=split)
    seed = cfg.train.seed
    held_from_train = split == "train" or cfg.eval.split or (split == "dev" and cfg.eval.dev_split)
    per_source = _read_all(cfg, cfg.data.train, report) if held_from_train else []
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
            convs += _mix(own, _read_all(cfg, own, report), report.sources[n:], seed)
    report.conversations = len(convs)
    return convs, report


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
            report.invalid_rows += 1
            report.add_problem(conv.source, conv.line, str(e).removeprefix(f"{conv.location()}: "))  # prefix once
            if cfg.data.on_invalid == "skip":
                report.skipped += 1
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
# cache: <cache_dir>/<key>.safetensors (flat int32 ids/labels + offsets) and <key>.json


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
    """A hash of everything that changes the tokens: input files (path, size, mtime), sources,
    data settings, seed and split, the tokenizer, the template and the code that encodes."""
    files = []
    sources = cfg.data.train + cfg.eval.data + cfg.eval.dev  # eval files change the train split's contamination findings
    for src in sources:
        files += hub.fingerprint(src, resolve_path(cfg, src.path))  # files: path, size, mtime
    code = b""
    from sft.data import chat, formats, masks
    from sft.data import sources as sources_mod

    for mod in (chat, masks, formats, sources_mod, hub):
        code += Path(str(mod.__file__)).read_bytes()
    code += Path(__file__).read_bytes()
    from sft.data import overlap, quality  # their findings are cached with the train split, and drop rows
    from sft.data import split as split_mod  # decides the eval.split rows

    code += Path(str(quality.__file__)).read_bytes() + Path(str(overlap.__file__)).read_bytes()
    code += Path(str(split_mod.__file__)).read_bytes()
    body = {
        "v": CACHE_VERSION,
        "split": split,
        "files": files,
        "sources": [asdict(s) for s in sources],
        "data": {k: v for k, v in asdict(cfg.data).items() if k not in ("train", "cache_dir", "packing", "select")},
        "eval_split": cfg.eval.split,
        "dev_split": cfg.eval.dev_split,
        "seed": cfg.train.seed,
        "tokenizer": _tokenizer_id(tokenizer),
        "template": template,
        "code": hashlib.sha256(code).hexdigest(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def save_cache(path: Path, ds: Dataset) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(e) for e in ds.examples], dtype=np.int64)
    tensors: dict[str, Any] = {
        "input_ids": np.array([t for e in ds.examples for t in e.input_ids], dtype=np.int32),
        "labels": np.array([t for e in ds.examples for t in e.labels], dtype=np.int32),
        "offsets": offsets,
    }
    meta = {
        "template": ds.template,
        "report": asdict(ds.report),
        "examples": [[e.source, e.line, e.truncated, e.meta] for e in ds.examples],
        "quality": ds.quality,
    }
    # tensors first, JSON last and both renamed into place: a crash never leaves a readable half
    for suffix, write in (
        (".safetensors", lambda p: save_file(tensors, str(p))),
        (".json", lambda p: p.write_text(json.dumps(meta), encoding="utf-8")),
    ):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path.with_suffix(suffix))


def load_cache(path: Path) -> Dataset | None:
    meta_path, tensor_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    from safetensors.numpy import load_file

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        t = load_file(str(tensor_path))
    except (OSError, ValueError):
        return None  # a damaged cache is rebuilt, not trusted
    ids, labels, off = t["input_ids"].tolist(), t["labels"].tolist(), t["offsets"].tolist()
    examples = [
        Example(ids[off[i] : off[i + 1]], labels[off[i] : off[i + 1]], src, line, trunc, m)
        for i, (src, line, trunc, m) in enumerate(meta["examples"])
    ]
    rep = dict(meta["report"])
    rep["sources"] = [SourceStats(**s) for s in rep["sources"]]
    report = DataReport(**rep)
    report.cached = True
    return Dataset(examples, report, meta["template"], meta.get("quality") or {})


def apply_quality(cfg: Config, ds: Dataset, convs: list[Conversation]) -> None:
    """Find the quality problems of the train split (``sft.data.quality``), count them in the
    report and remove the rows of the kinds in ``data.quality.drop`` from ``ds.examples``."""
    from collections import Counter

    from sft.data import quality

    q = cfg.data.quality
    evals = collect_conversations(cfg, "eval")[0] if (cfg.eval.data or cfg.eval.split) else []
    times = Counter((c.source, c.line) for c in convs)  # weight samples rows with replacement
    trained: Counter[tuple[str, int]] = Counter()
    for ex in ds.examples:
        trained[(ex.source, ex.line)] += ex.num_trained
    lengths = {k: n // times[k] for k, n in trained.items() if times[k]}
    cut = {(ex.source, ex.line) for ex in ds.examples if ex.truncated}
    settings = quality.QualitySettings(q.near_duplicate_threshold, tuple(q.boilerplate))
    ds.quality = quality.find_problems(convs, evals, settings, lengths, cut)
    r = ds.report
    r.quality_counts = quality.counts(ds.quality)
    drop = quality.rows_to_drop(ds.quality, q.drop)
    if not drop:
        return
    r.quality_dropped = {k: 0 for k in q.drop}
    for kind in drop.values():
        r.quality_dropped[kind] += 1
    ds.examples = [ex for ex in ds.examples if (ex.source, ex.line) not in drop]
    r.examples = len(ds.examples)
    r.lengths = [len(e) for e in ds.examples]
    r.total_tokens = sum(r.lengths)
    r.trained_tokens = sum(e.num_trained for e in ds.examples)


def _say_dropped(report: DataReport, strict: bool) -> None:
    if strict and report.quality_dropped:  # training says it; `sft data check` shows it in its table
        kinds = ", ".join(f"{k} {n}" for k, n in report.quality_dropped.items())
        print(f"data.quality.drop: removed {sum(report.quality_dropped.values())} rows ({kinds})", file=sys.stderr)


def build_dataset(
    cfg: Config, tokenizer: Any, split: str = "train", *, strict: bool = True, use_cache: bool = True
) -> Dataset:
    """Tokenized examples of ``split``, truncated/dropped by length, deduplicated, cached.

    ``strict=False`` (used by ``sft data check``) reports invalid rows instead of raising.
    """
    from sft.data import chat

    template = chat.resolve_template(cfg.data.template, tokenizer, cfg.base_dir, cfg.data.template_kwargs)
    path = cache_dir(cfg) / cache_key(cfg, tokenizer, template, split) if use_cache else None
    if path is not None:
        cached = load_cache(path)
        if cached is not None and (not strict or not cached.report.invalid or cfg.data.on_invalid == "skip"):
            _say_dropped(cached.report, strict)
            return _select(cfg, cached, tokenizer) if split == "train" else cached
    convs, report = collect_conversations(cfg, split)
    if strict and report.invalid and cfg.data.on_invalid == "error":
        raise invalid_error(report)
    examples = tokenize_conversations(convs, tokenizer, template, cfg, report)
    if strict and report.invalid and cfg.data.on_invalid == "error":
        raise invalid_error(report)
    ds = Dataset(examples, report, template)
    if split == "train":
        apply_quality(cfg, ds, convs)
        _say_dropped(report, strict)
    if path is not None and (not report.invalid or cfg.data.on_invalid == "skip"):
        save_cache(path, ds)  # before data.select: the scores are read afresh on each load
    return _select(cfg, ds, tokenizer) if split == "train" else ds


def _select(cfg: Config, ds: Dataset, tokenizer: Any) -> Dataset:
    """``data.select``: keep the rows the model scores pick (sft.data.select)."""
    if cfg.data.select is None:
        return ds
    from sft.data.select import apply_select

    ds.examples, ds.report.select = apply_select(cfg, ds.examples, tokenizer)
    r = ds.report
    r.examples, r.lengths = len(ds.examples), [len(e) for e in ds.examples]
    r.total_tokens, r.trained_tokens = sum(r.lengths), sum(e.num_trained for e in ds.examples)
    return ds


def labels_ok(ex: Example) -> bool:
    """Labels are aligned with input_ids: each is IGNORE or the token itself.

    >>> labels_ok(Example([5, 6], [-100, 6])), labels_ok(Example([5, 6], [-100, 7]))
    (True, False)
    """
    return len(ex.labels) == len(ex.input_ids) and all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels))
