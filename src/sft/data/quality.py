"""Data quality: the rows that will hurt a tuned model, and why (``sft data check``, ``data.quality``).

Seven kinds of finding, each a list in reading order (the JSON of ``sft data check`` under ``quality``):

- ``near_duplicates``: ``{"file", "line", "duplicate_of": {"file", "line"}, "similarity"}``. The
  Jaccard similarity of the rows' word 3-shingles (user, assistant and tool text; system prompts and
  tool schemas left out, they repeat by design) is at least ``data.quality.near_duplicate_threshold``
  (default 0.8). Candidates come from MinHash LSH (``sft.data.overlap``: numpy MinHash,
  128 bins, bands chosen so a pair at the threshold is a candidate with probability 0.99),
  so the time is linear in the rows, and every candidate is confirmed with the exact Jaccard, which
  is the ``similarity`` reported (in a bucket of the LSH, a row is checked against the first 100
  rows only). A row points at the earliest row it nearly duplicates. A row that repeats an earlier
  one exactly (the report's ``duplicates``) is listed too, with similarity 1.0, unless
  ``data.dedup`` already removed it.
- ``contamination``: ``{"eval": {"file", "line"}, "train": {"file", "line"}, "overlap"}``: an eval
  row whose prompt (its last user message) or reply (its last assistant message, the reference)
  overlaps one training row: ``overlap`` is the share of that text's word 8-grams found in the
  training row (a text shorter than 8 words counts as one n-gram, so it matches a training message
  that says exactly the same); reported at 0.5 and above. Texts under 3 words are not compared.
- ``empty_responses``, ``truncated_responses``, ``boilerplate``, ``placeholders``,
  ``length_outliers``: ``{"file", "line", "why"}`` (the checks of one reply: ``sft.data.replies``).
  Empty: a trained reply with no letter or digit, or a placeholder (``N/A``, ``<noinput>`` ...).
  Truncated: the example was cut at ``data.max_length``; an unclosed code fence,
  bracket or brace; JSON that does not parse where the system prompt asks for JSON (or the reply
  starts as JSON where the prompt asks for it); the reply stops on a comma, colon or a word that
  cannot end a sentence ("the", "and", ...); or several replies stop at exactly the longest length
  without a closing punctuation mark (a generation limit). Boilerplate: a phrase of
  ``sft.data.replies.BOILERPLATE`` (AI self-references) or ``sft.data.refusals.REFUSAL_PHRASES`` (stock
  refusals; not in rows whose category is ``harmful``, where a refusal is the lesson) or of
  ``data.quality.boilerplate``. Placeholders: a trained reply (content or reasoning, outside code)
  says an unfilled template variable (``{{name}}``, ``{{ user.name }}``) or a fill-in for a person
  (``[Your Name]``, ``<insert date>``; not in a reply that is a form for its reader, a signature
  under "Best regards," or ``Date: [insert date]``). Length outliers: a robust z-score (median and
  median absolute deviation of log trained tokens) beyond 3.5.

``data.quality.drop`` names kinds whose rows training removes: the later row of a near-duplicate
pair, the training row of a contaminated pair, the row itself for the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from sft.data.minhash import EMPTY, band_keys, lsh_params
from sft.data.overlap import (
    CHUNK,
    NEAR_DUPLICATE_THRESHOLD,
    Loc,
    Tick,
    contamination,  # noqa: F401 (part of this module's API: tests and callers import it from here)
    exact_keys,
    loc,
    near_duplicates,
    overlaps,
    row_signatures,
    worst_contamination,
)
from sft.data.replies import (
    BOILERPLATE,
    boilerplate_reason,
    empty_reason,
    ends_open,
    placeholder_reason,
    reply_words,
    truncation_reason,
)
from sft.data.types import Conversation

KINDS = ("near_duplicates", "contamination", "empty_responses", "truncated_responses", "boilerplate",
         "placeholders", "length_outliers")
# the fix, said under a kind's findings in ``sft data check``
HINTS = {"placeholders": "fill them in (e.g. replace {{name}} with your assistant's name) or drop the rows: "
                         "data.quality.drop: [placeholders]"}
OUTLIER_Z = 3.5  # |robust z| beyond this is an outlier (Iglewicz & Hoaglin)
OUTLIER_MIN_ROWS = 8  # fewer rows than this: no length statistics


def unique_rows(convs: Iterable[Conversation]) -> list[Conversation]:
    """Each (file, line) once, in first-seen order (``weight`` samples rows with replacement).

    >>> a, b = Conversation([], "f", 1), Conversation([], "f", 2)
    >>> [c.line for c in unique_rows([a, b, a])]
    [1, 2]
    """
    seen: set[Loc] = set()
    out = []
    for c in convs:
        if (c.source, c.line) not in seen:
            seen.add((c.source, c.line))
            out.append(c)
    return out


def robust_z(values: list[float]) -> list[float]:
    """Robust z-scores: 0.6745 (x - median) / MAD, or (x - median) / (1.2533 mean |x - median|)
    when the MAD is 0; all zeros when the values do not spread.

    >>> [round(z, 2) for z in robust_z([1, 2, 3, 4, 100])]
    [-1.35, -0.67, 0.0, 0.67, 65.43]
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return []
    dev = np.abs(x - np.median(x))
    mad = float(np.median(dev))
    if mad > 0:
        return (0.6745 * (x - np.median(x)) / mad).tolist()
    mean_ad = float(dev.mean())
    if mean_ad > 0:
        return ((x - np.median(x)) / (1.253314 * mean_ad)).tolist()
    return [0.0] * len(x)


def length_outliers(convs: list[Conversation], lengths: dict[Loc, int] | np.ndarray | None = None,
                    z: float = OUTLIER_Z, words: list[int] | np.ndarray | None = None,
                    among: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Rows whose trained tokens (``lengths``: by (file, line), or int64 [n] per row with -1 for a
    row not trained; words of trained replies without it, ``words`` when already counted) are
    far from the others' on a log scale. ``among``: the indices of the rows to consider (all)."""
    idx = np.arange(len(convs)) if among is None else np.asarray(among, dtype=np.int64)
    if lengths is not None:
        n_tok = lengths if isinstance(lengths, np.ndarray) else _per_row(convs, lengths, -1, np.int64)
        values = np.asarray(n_tok, dtype=np.int64)[idx]
        idx, values = idx[values >= 0], values[values >= 0]  # dropped from training already (too long, nothing to train)
    elif words is not None:
        values = np.asarray(words, dtype=np.int64)[idx]
    else:
        values = np.array([reply_words(convs[i]) for i in idx.tolist()], dtype=np.int64)
    if len(idx) < OUTLIER_MIN_ROWS:
        return []
    unit = "trained tokens" if lengths is not None else "words in trained replies"
    median = int(np.sort(values)[len(values) // 2])
    scores = np.asarray(robust_z(np.log(np.maximum(values, 1)).tolist()))
    out = []
    for k in np.flatnonzero(np.abs(scores) > z).tolist():
        score, n = float(scores[k]), int(values[k])
        side = "long" if score > 0 else "short"
        out.append({**loc(convs[int(idx[k])]), "why": f"{n} {unit}, robust z {score:+.1f} (median {median}): too {side}"})
    return out


# ---------------------------------------------------------------------------------------------
# all of them


@dataclass
class QualitySettings:
    """What ``find_problems`` needs of ``data.quality`` (a plain object, so data stays pure)."""

    near_duplicate_threshold: float = NEAR_DUPLICATE_THRESHOLD
    boilerplate: tuple[str, ...] = ()

    def phrases(self) -> tuple[str, ...]:
        from sft.data.refusals import normalize

        return BOILERPLATE + tuple(normalize(p) for p in self.boilerplate if p.strip())


@dataclass
class RowFacts:
    """What the quality analysis needs of each row, computed once per row (and cached per source,
    ``sft.data.quality_cache``): the exact-repeat key, the LSH band keys of its MinHash signature
    and whether it has any shingle, the reasons of the row checks (``sft.data.replies``; ``truncated``
    without the max_length cut), whether the last reply ends open, and the words of the trained
    replies."""

    keys: np.ndarray  # uint64 [n] (overlap.exact_keys)
    bands: np.ndarray  # uint64 [n, bands] (minhash.band_keys at the near-duplicate threshold)
    live: np.ndarray  # bool [n]: the row has a shingle (its signature is not all EMPTY)
    empty: list[str | None]
    truncated: list[str | None]
    boilerplate: list[str | None]
    placeholders: list[str | None]
    open_end: np.ndarray  # bool [n]
    words: np.ndarray  # int64 [n]

    def take(self, idx: np.ndarray) -> RowFacts:
        pick = idx.tolist()
        return RowFacts(self.keys[idx], self.bands[idx], self.live[idx], [self.empty[i] for i in pick],
                        [self.truncated[i] for i in pick], [self.boilerplate[i] for i in pick],
                        [self.placeholders[i] for i in pick], self.open_end[idx], self.words[idx])


def row_facts(rows: list[Conversation], settings: QualitySettings, tick: Tick | None = None,
              sig_out: BinaryIO | None = None) -> RowFacts:
    """``RowFacts`` of ``rows``, in order, ``CHUNK`` rows at a time (``tick``: told after each).
    ``sig_out``: a file the signatures (uint32 [len(rows), NUM_PERM], C order) are written to, a
    chunk at a time (the cache keeps them; a million rows' signatures are 512 MB, never held)."""
    from sft.data.refusals import REFUSAL_PHRASES
    from sft.data.rows import materialize

    phrases = settings.phrases()
    threshold = settings.near_duplicate_threshold
    empty: list[str | None] = []
    truncated: list[str | None] = []
    boiler: list[str | None] = []
    unfilled: list[str | None] = []
    keys = np.zeros(len(rows), np.uint64)
    bands = np.empty((len(rows), lsh_params(threshold)[0]), np.uint64)
    live = np.zeros(len(rows), dtype=bool)
    open_end, words = [], []
    for a in range(0, len(rows), CHUNK):
        chunk = materialize(rows[a : a + CHUNK])  # rows of a JSONL file: parsed again, a chunk at a time
        open_end += [ends_open(c) for c in chunk]
        words += [reply_words(c) for c in chunk]
        for conv in chunk:
            text = conv.is_text
            empty.append(None if text else empty_reason(conv))
            truncated.append(None if text else truncation_reason(conv))
            boiler.append(None if text else boilerplate_reason(conv, phrases, REFUSAL_PHRASES))
            unfilled.append(None if text else placeholder_reason(conv))
        keys[a : a + len(chunk)] = exact_keys(chunk)
        sig = row_signatures(chunk)
        bands[a : a + len(chunk)] = band_keys(sig, threshold)
        live[a : a + len(chunk)] = sig[:, 0] != EMPTY
        if sig_out is not None:
            sig_out.write(np.ascontiguousarray(sig, dtype="<u4").tobytes())
        if tick:
            tick(len(chunk))
    return RowFacts(keys, bands, live, empty, truncated, boiler, unfilled,
                    np.array(open_end, dtype=bool), np.array(words, dtype=np.int64))


def find_problems(
    train: list[Conversation],
    eval_convs: list[Conversation] | None = None,
    settings: QualitySettings | None = None,
    lengths: dict[Loc, int] | np.ndarray | None = None,
    cut: set[Loc] | np.ndarray | None = None,
    facts: RowFacts | None = None,
    contaminated: dict[tuple[int, int], float] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every finding of every kind, keyed by ``KINDS``.

    ``lengths``: trained tokens per (file, line), or per row of ``unique_rows(train)`` as int64 [n]
    (-1: not trained); ``cut``: rows truncated at data.max_length, as a set of (file, line) or
    bool [n]. ``facts``: ``row_facts`` of ``train``, which is then already ``unique_rows`` (the
    caller made it so), and ``contaminated``: ``overlaps`` of the unique eval rows against them,
    when already known (``sft.data.quality_cache``).
    """
    settings = settings or QualitySettings()
    rows = train if facts is not None else unique_rows(train)
    facts = facts or row_facts(rows, settings)
    found: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    found["near_duplicates"] = near_duplicates(rows, settings.near_duplicate_threshold, facts.bands, facts.live,
                                                facts.keys)
    if eval_convs:
        evals = unique_rows(eval_convs)
        pairs = overlaps(evals, rows) if contaminated is None else contaminated
        found["contamination"] = worst_contamination(evals, rows, pairs)
    n_tok = _per_row(rows, lengths, -1, np.int64) if lengths is not None else None
    cut_at = _per_row(rows, cut, False, bool) if cut is not None else np.zeros(len(rows), bool)
    limit = int(n_tok.max()) if n_tok is not None and (n_tok >= 0).any() else None
    at_limit = (n_tok == limit) if n_tok is not None and limit is not None else np.zeros(len(rows), bool)
    n_at_limit = int(at_limit.sum())
    flagged = np.flatnonzero(cut_at | (at_limit & facts.open_end) | _flagged(facts, len(rows)))
    for i in flagged.tolist():  # the rows with a finding of these kinds: few, in reading order
        conv = rows[i]
        if conv.is_text:
            continue
        why = facts.empty[i]
        if why:
            found["empty_responses"].append({**loc(conv), "why": why})
            continue  # an empty reply is not also cut off or boilerplate
        why = "cut at data.max_length: the example is longer" if cut_at[i] else facts.truncated[i]
        if why is None and n_at_limit >= 3 and at_limit[i] and facts.open_end[i]:
            why = f"stops at {limit} trained tokens like {n_at_limit - 1} other rows (the longest): a length limit"
        if why:
            found["truncated_responses"].append({**loc(conv), "why": why})
        why = facts.boilerplate[i]
        if why:
            found["boilerplate"].append({**loc(conv), "why": why})
        why = facts.placeholders[i]
        if why:
            found["placeholders"].append({**loc(conv), "why": why})
    kept = np.flatnonzero(~_flagged_empty(facts, len(rows)))  # empty rows are short by definition: said once
    found["length_outliers"] = length_outliers(rows, n_tok, words=facts.words, among=kept)
    return found


def _per_row(rows: list[Conversation], values: dict[Loc, Any] | set[Loc] | np.ndarray, missing: Any,
             dtype: Any) -> np.ndarray:
    """``values`` per row of ``rows``: an array as it is, a dict or set looked up by (file, line)."""
    if isinstance(values, np.ndarray):
        return values.astype(dtype, copy=False)
    if isinstance(values, set):
        return np.array([(c.source, c.line) in values for c in rows], dtype=dtype)
    return np.array([values.get((c.source, c.line), missing) for c in rows], dtype=dtype)


def _flagged(facts: RowFacts, n: int) -> np.ndarray:
    """bool [n]: rows with an empty, truncated, boilerplate or placeholder reason."""
    out = _flagged_empty(facts, n)
    for reasons in (facts.truncated, facts.boilerplate, facts.placeholders):
        out[[i for i, why in enumerate(reasons) if why]] = True
    return out


def _flagged_empty(facts: RowFacts, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[[i for i, why in enumerate(facts.empty) if why]] = True
    return out


def rows_to_drop(found: dict[str, list[dict[str, Any]]], kinds: Iterable[str]) -> dict[Loc, str]:
    """(file, line) -> the first kind that drops it, for the kinds named in ``data.quality.drop``.

    >>> rows_to_drop({"near_duplicates": [{"file": "a", "line": 3, "duplicate_of": {"file": "a", "line": 1}}],
    ...               "contamination": [{"eval": {"file": "e", "line": 1}, "train": {"file": "a", "line": 1}}]},
    ...              ["near_duplicates", "contamination"])
    {('a', 3): 'near_duplicates', ('a', 1): 'contamination'}
    """
    out: dict[Loc, str] = {}
    for kind in kinds:
        for item in found.get(kind, []):
            where = item["train"] if kind == "contamination" else item
            out.setdefault((where["file"], where["line"]), kind)
    return out


def counts(found: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    return {k: len(found.get(k, [])) for k in KINDS}


def format_quality(found: dict[str, list[dict[str, Any]]], dropped: dict[str, int] | None = None,
                   examples: int = 3) -> str:
    """The human ``quality`` section of ``sft data check``: counts, then the first few of each kind
    and, for a kind with a ``HINTS`` line that is not dropped already, how to fix it.

    >>> print(format_quality({"empty_responses": [{"file": "t.jsonl", "line": 4, "why": "no words"}],
    ...                       "placeholders": [{"file": "t.jsonl", "line": 7, "why": 'has "{{name}}"'}]}))
    quality:
      near_duplicates          0
      contamination            0
      empty_responses          1
        t.jsonl:4: no words
      truncated_responses      0
      boilerplate              0
      placeholders             1
        t.jsonl:7: has "{{name}}"
        fill them in (e.g. replace {{name}} with your assistant's name) or drop the rows: data.quality.drop: [placeholders]
      length_outliers          0
    """
    lines = ["quality:"]
    for kind in KINDS:
        items = found.get(kind, [])
        gone = (dropped or {}).get(kind)
        note = f"  ({gone} rows dropped by data.quality.drop)" if gone else ""
        lines.append(f"  {kind:<24} {len(items)}{note}")
        for item in items[:examples]:
            if kind == "near_duplicates":
                d = item["duplicate_of"]
                text = f"{item['file']}:{item['line']}: {item['similarity']:.2f} similar to {d['file']}:{d['line']}"
            elif kind == "contamination":
                e, t = item["eval"], item["train"]
                text = f"{e['file']}:{e['line']}: {100 * item['overlap']:.0f}% overlap with {t['file']}:{t['line']}"
            else:
                text = f"{item['file']}:{item['line']}: {item['why']}"
            lines.append(f"    {text}")
        if len(items) > examples:
            lines.append(f"    ... {len(items) - examples} more (--json lists all)")
        if items and kind in HINTS and not gone:
            lines.append(f"    {HINTS[kind]}")
    return "\n".join(lines)
