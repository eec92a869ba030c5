"""``data.select``: keep training rows by the scores ``sft data score`` wrote (sft.evaluation.scoring).

A scores file has one JSON object per trained reply: ``row`` ("file:line"), ``turn`` (the reply's
index in its row), ``loss`` (mean token loss of the reply given its prompt), ``loss_alone`` (the
same reply tokens after only the template's reply header), ``ifd`` (loss / loss_alone, the
Instruction-Following Difficulty of Cherry LLM, Li et al. 2024) and ``eot_prob`` (the probability
of the end-of-turn marker right after the reply; null where the reply was truncated).

A row is judged by its replies: it is dropped when any reply has ``ifd > drop_ifd_above`` (the
prompt does not help: a mismatched pair) or ``eot_prob < min_eot_prob`` (the model would go on: an
unfinished reply); ``by: ifd`` then keeps the ``keep`` rows with the highest mean IFD (the hardest
to follow, Cherry's selection), ``by: random`` a seeded draw of the same size. Pure functions on
lists and dicts; reading the cache needs the scorer's tokenizer (to name the tokenized data).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.config import Config, SelectConfig, resolve_path
from sft.errors import SftError

SCORES_VERSION = 1  # bump when sft.evaluation.scoring computes a score differently (names the cache)
EXAMPLES = 3  # rows of each kind shown in the run report
# `sft data check --score` lists replies whose end-of-turn probability is below this: in
# bench/ifd_selection.py (SmolLM2-135M-Instruct) replies cut mid-word scored < 1e-6, good ones >= 0.006
SUSPECT_EOT = 0.001

Key = tuple[str, int]  # (source file, line)


@dataclass
class RowScore:
    """A row's replies folded into one judgement."""

    row: str  # "file:line"
    ifd: float | None  # mean IFD of the replies that have one
    max_ifd: float | None
    min_eot: float | None  # lowest end-of-turn probability of its replies
    text: str  # the start of its first reply


def row_scores(scores: list[dict[str, Any]]) -> dict[Key, RowScore]:
    """Fold reply scores into row scores, keyed by (source, line).

    >>> r = row_scores([{"source": "a", "line": 1, "ifd": 0.5, "eot_prob": 0.9, "text": "x"},
    ...                 {"source": "a", "line": 1, "ifd": 1.5, "eot_prob": 0.2, "text": "y"}])
    >>> r[("a", 1)].ifd, r[("a", 1)].max_ifd, r[("a", 1)].min_eot
    (1.0, 1.5, 0.2)
    """
    grouped: dict[Key, list[dict[str, Any]]] = {}
    for s in scores:
        grouped.setdefault((str(s["source"]), int(s["line"])), []).append(s)
    out = {}
    for (src, line), replies in grouped.items():
        ifds = [float(r["ifd"]) for r in replies if r.get("ifd") is not None]
        eots = [float(r["eot_prob"]) for r in replies if r.get("eot_prob") is not None]
        out[(src, line)] = RowScore(f"{src}:{line}", sum(ifds) / len(ifds) if ifds else None,
                                    max(ifds) if ifds else None, min(eots) if eots else None,
                                    str(replies[0].get("text", "")))
    return out


def keep_count(keep: float | None, rows: int) -> int | None:
    """Rows ``keep`` stands for: a fraction (< 1, rounded, at least 1) or a count.

    >>> keep_count(0.1, 999), keep_count(25, 999), keep_count(0.001, 10), keep_count(None, 10)
    (100, 25, 1, None)
    """
    if keep is None:
        return None
    return max(1, round(keep * rows)) if keep < 1 else int(keep)


def choose(rows: list[Key], scores: dict[Key, RowScore], sel: SelectConfig, seed: int) -> tuple[list[Key], dict[Key, str]]:
    """(kept rows in input order, {dropped row: reason}); reasons: ``ifd_above``, ``eot_below``,
    ``not_selected`` (below the top ``keep``, or not drawn).

    >>> s = {("f", i): RowScore(f"f:{i}", v, v, e, "") for i, (v, e) in enumerate([(0.5, .9), (1.2, .9), (0.8, .01), (0.7, .9)])}
    >>> choose(list(s), s, SelectConfig(keep=1, drop_ifd_above=1.0, min_eot_prob=0.1), seed=0)
    ([('f', 3)], {('f', 1): 'ifd_above', ('f', 2): 'eot_below', ('f', 0): 'not_selected'})
    """
    dropped: dict[Key, str] = {}
    passing = []
    for k in rows:
        s = scores[k]
        if sel.drop_ifd_above is not None and s.max_ifd is not None and s.max_ifd > sel.drop_ifd_above:
            dropped[k] = "ifd_above"
        elif sel.min_eot_prob is not None and s.min_eot is not None and s.min_eot < sel.min_eot_prob:
            dropped[k] = "eot_below"
        else:
            passing.append(k)
    n = keep_count(sel.keep, len(rows))
    if n is not None and n < len(passing):
        if sel.by == "random":
            chosen = set(random.Random(seed).sample(passing, n))
        else:  # highest IFD first; rows without an IFD (no reply tokens) last; ties in input order
            order = sorted(range(len(passing)), key=lambda i: -(scores[passing[i]].ifd or -math.inf))
            chosen = {passing[i] for i in order[:n]}
        dropped.update({k: "not_selected" for k in passing if k not in chosen})
        passing = [k for k in passing if k in chosen]
    return passing, dropped


# ---------------------------------------------------------------------------------------------
# the scores file and its cache


def scorer_id(name: str, revision: str | None, base_dir: str = ".") -> dict[str, Any]:
    """What names a scorer in the cache key: its name, revision and, for a local folder, its
    weight files' sizes and mtimes (a retrained run scores afresh)."""
    out: dict[str, Any] = {"name": name, "revision": revision}
    d = Path(name).expanduser()
    if not d.is_absolute() and not d.exists():
        d = Path(base_dir) / d
    if d.is_dir():
        out["weights"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.glob("*.safetensors"))]
    return out


def scores_path(cfg: Config, scorer: str, scorer_tokenizer: Any) -> Path:
    """The cached scores of ``cfg``'s training data by ``scorer`` (tokenized by its tokenizer)."""
    from sft.data.chat import config_template
    from sft.data.pipeline import cache_dir, cache_key

    template = config_template(cfg, scorer_tokenizer)
    data_key = cache_key(cfg, scorer_tokenizer, template, "train")  # data.select is not part of it
    revision = cfg.revision if scorer == cfg.model else None
    body = json.dumps([SCORES_VERSION, data_key, scorer_id(scorer, revision, cfg.base_dir)], sort_keys=True)
    return cache_dir(cfg) / "scores" / f"{hashlib.sha256(body.encode()).hexdigest()[:24]}.jsonl"


def read_scores(path: Path) -> list[dict[str, Any]]:
    """The reply scores of a scores file; a line that is not a score is an SftError naming it."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not {"source", "line", "ifd", "eot_prob"} <= set(row):
            raise SftError(f"{path}:{i}: not a reply score (a JSON object with source, line, ifd, eot_prob); "
                           "write the file with `sft data score CONFIG --out FILE`")
        out.append(row)
    return out


def find_scores(cfg: Config, tokenizer: Any) -> tuple[Path, list[dict[str, Any]]]:
    """``data.select.scores``, or else the cache ``sft data score`` fills; missing is an error."""
    sel = cfg.data.select
    assert sel is not None  # the caller checks
    if sel.scores:
        path = resolve_path(cfg, sel.scores)
        if not path.is_file():
            raise SftError(f"data.select.scores: {path} is not a file; write it with "
                           f"`sft data score CONFIG --out {sel.scores}`")
        return path, read_scores(path)
    scorer = sel.scorer or cfg.model
    tok = tokenizer
    if scorer != cfg.model:
        from sft.models.load import load_tokenizer

        tok = load_tokenizer(scorer, trust_remote_code=cfg.trust_remote_code)
    path = scores_path(cfg, scorer, tok)
    if not path.is_file():
        raise SftError(f"data.select: the training data has no scores by {scorer} yet; run "
                       f"`sft data score CONFIG{'' if scorer == cfg.model else f' --scorer {scorer}'}` first "
                       "(it caches them), or give data.select.scores: FILE")
    return path, read_scores(path)


# ---------------------------------------------------------------------------------------------
# the pipeline's hook


def _example(k: Key, s: RowScore, reason: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"row": s.row, "ifd": _round(s.ifd), "eot_prob": _round(s.min_eot), "text": s.text}
    if reason:
        out["reason"] = reason
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def select_report(sel: SelectConfig, path: Path, rows: list[Key], scores: dict[Key, RowScore],
                  kept: list[Key], dropped: dict[Key, str]) -> dict[str, Any]:
    """What the run report says: counts per reason and a few rows of each (the extremes)."""
    reasons = ("ifd_above", "eot_below", "not_selected")
    by_reason = {r: [k for k in rows if dropped.get(k) == r] for r in reasons}
    worst = {  # the rows most clearly of each kind
        "ifd_above": sorted(by_reason["ifd_above"], key=lambda k: -(scores[k].max_ifd or 0.0)),
        "eot_below": sorted(by_reason["eot_below"], key=lambda k: scores[k].min_eot or 0.0),
        "not_selected": by_reason["not_selected"],
    }
    top = sorted(kept, key=lambda k: -(scores[k].ifd or -math.inf)) if sel.by == "ifd" else kept
    return {
        "by": sel.by, "keep": sel.keep, "drop_ifd_above": sel.drop_ifd_above, "min_eot_prob": sel.min_eot_prob,
        "scores": str(path), "rows": len(rows), "kept": len(kept),
        "dropped": {r: len(by_reason[r]) for r in reasons},
        "kept_examples": [_example(k, scores[k]) for k in top[:EXAMPLES]],
        "dropped_examples": [_example(k, scores[k], r) for r in reasons for k in worst[r][:EXAMPLES]],
    }


def apply_select(cfg: Config, examples: list[Any], tokenizer: Any) -> tuple[list[Any], dict[str, Any]]:
    """``examples`` (sft.data.types.Example) of the rows ``data.select`` keeps, and its report."""
    sel = cfg.data.select
    if sel is None:
        return examples, {}
    path, raw = find_scores(cfg, tokenizer)
    scores = row_scores(raw)
    rows = list(dict.fromkeys((ex.source, ex.line) for ex in examples))
    missing = [k for k in rows if k not in scores]
    if missing:
        shown = ", ".join(f"{s}:{n}" for s, n in missing[:5])
        raise SftError(f"data.select: {len(missing)} training row(s) have no score in {path} (e.g. {shown}); "
                       "the data changed since it was scored: run `sft data score CONFIG` again")
    kept, dropped = choose(rows, scores, sel, cfg.train.seed)
    keep = set(kept)
    report = select_report(sel, path, rows, scores, kept, dropped)
    d = report["dropped"]
    print(f"data.select: kept {len(kept)} of {len(rows)} rows by {sel.by} (dropped: ifd above "
          f"{sel.drop_ifd_above} {d['ifd_above']}, end-of-turn below {sel.min_eot_prob} {d['eot_below']}, "
          f"not selected {d['not_selected']})", file=sys.stderr)
    return [ex for ex in examples if (ex.source, ex.line) in keep], report


# ---------------------------------------------------------------------------------------------
# `sft data check --score`


def _quantiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p10/p50/p90 and the extremes.

    >>> _quantiles([3.0, 1.0, 2.0])
    {'min': 1.0, 'p10': 1.0, 'p50': 2.0, 'p90': 3.0, 'max': 3.0}
    """
    s = sorted(values)
    if not s:
        return {}
    at = {p: s[max(0, math.ceil(p / 100 * len(s)) - 1)] for p in (10, 50, 90)}
    return {"min": round(s[0], 4), **{f"p{p}": round(v, 4) for p, v in at.items()}, "max": round(s[-1], 4)}


def score_summary(scores: list[dict[str, Any]], listed: int = 10) -> dict[str, Any]:
    """The distribution of the reply scores and the replies that look mismatched (``ifd > 1``: the
    prompt makes the reply less likely) or unfinished (end-of-turn probability below SUSPECT_EOT)."""
    ifd = [float(s["ifd"]) for s in scores if s.get("ifd") is not None]
    eot = [float(s["eot_prob"]) for s in scores if s.get("eot_prob") is not None]
    fields = ("row", "turn", "ifd", "eot_prob", "text")
    mismatched = sorted((s for s in scores if (s.get("ifd") or 0.0) > 1.0), key=lambda s: -float(s["ifd"]))
    unfinished = sorted((s for s in scores if s.get("eot_prob") is not None and s["eot_prob"] < SUSPECT_EOT),
                        key=lambda s: float(s["eot_prob"]))
    return {
        "replies": len(scores),
        "ifd": _quantiles(ifd), "eot_prob": _quantiles(eot),
        "loss": _quantiles([float(s["loss"]) for s in scores if s.get("loss") is not None]),
        "mismatched": len(mismatched), "unfinished": len(unfinished),
        "mismatched_rows": [{k: s.get(k) for k in fields} for s in mismatched[:listed]],
        "unfinished_rows": [{k: s.get(k) for k in fields} for s in unfinished[:listed]],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """``score_summary`` as the text of ``sft data check --score``."""
    def dist(d: dict[str, float]) -> str:
        return "  ".join(f"{k} {v:.4g}" for k, v in d.items()) or "-"

    lines = [f"model scores ({summary['replies']} replies; sft data score):",
             f"  IFD (loss given prompt / loss alone): {dist(summary['ifd'])}",
             f"  end-of-turn probability after the reply: {dist(summary['eot_prob'])}",
             f"  reply loss given prompt: {dist(summary['loss'])}",
             f"  mismatched? IFD > 1 (the prompt does not help): {summary['mismatched']}"]
    lines += [f"    {r['row']} ifd {r['ifd']:.3f}: {r['text']!r}" for r in summary["mismatched_rows"]]
    lines.append(f"  unfinished? end-of-turn probability < {SUSPECT_EOT}: {summary['unfinished']}")
    lines += [f"    {r['row']} eot {r['eot_prob']:.2g}: {r['text']!r}" for r in summary["unfinished_rows"]]
    return "\n".join(lines)
