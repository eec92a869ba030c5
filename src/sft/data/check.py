"""What ``sft data check`` and ``sft data preview`` show: statistics, a text histogram, the
report as text, and examples with trained tokens marked. Pure functions on lists and dicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft.data.types import IGNORE

GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"
PERCENTILES = (50, 90, 95, 99, 100)


def percentiles(values: Sequence[int] | np.ndarray, ps: tuple[int, ...] = PERCENTILES) -> dict[str, int]:
    """Nearest-rank percentiles.

    >>> percentiles([5, 1, 4, 2, 3], (50, 100))
    {'p50': 3, 'p100': 5}
    >>> percentiles([], (50,))
    {'p50': 0}
    """
    s = np.sort(np.asarray(values, dtype=np.int64))
    if not len(s):
        return {f"p{p}": 0 for p in ps}
    return {f"p{p}": int(s[max(0, math.ceil(p / 100 * len(s)) - 1)]) for p in ps}


def histogram(values: Sequence[int] | np.ndarray, bins: int = 8, width: int = 40, limit: int | None = None) -> list[str]:
    """A text histogram, one line per equal-width bin; ``limit`` (max_length) is marked.

    >>> for line in histogram([1, 2, 2, 3, 9], bins=2, width=4): print(line)
         1-5     |#### 4
         6-10    |#    1
    """
    arr = np.asarray(values, dtype=np.int64)
    if not len(arr):
        return ["(no examples)"]
    lo, hi = int(arr.min()), int(arr.max())
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts = np.bincount(np.minimum(bins - 1, (arr - lo) // step), minlength=bins).tolist()
    while counts and counts[-1] == 0:
        counts.pop()
    top = max(counts)
    out = []
    for i, c in enumerate(counts):
        a, b = lo + i * step, lo + (i + 1) * step - 1
        bar = "#" * (math.ceil(c / top * width) if c else 0)
        mark = "  <- max_length" if limit is not None and a <= limit <= b else ""
        out.append(f"{a:>6}-{b:<6}|{bar:<{width}} {c}{mark}")
    return out


def spans(labels: list[int]) -> list[tuple[int, int, bool]]:
    """Runs of trained / masked positions as (start, end, trained).

    >>> spans([-100, -100, 7, 8, -100])
    [(0, 2, False), (2, 4, True), (4, 5, False)]
    """
    out: list[tuple[int, int, bool]] = []
    for i, lab in enumerate(labels):
        trained = lab != IGNORE
        if out and out[-1][2] == trained:
            out[-1] = (out[-1][0], i + 1, trained)
        else:
            out.append((i, i + 1, trained))
    return out


def render(pieces: list[tuple[str, bool]], color: bool) -> str:
    """Join decoded spans, marking trained ones: green (tty) or ``[[...]]`` (plain text).

    >>> render([("<user>hi", False), ("yo<end>", True)], color=False)
    '<user>hi[[yo<end>]]'
    """
    if color:
        return "".join(f"{GREEN}{t}{RESET}" if trained else f"{DIM}{t}{RESET}" for t, trained in pieces)
    return "".join(f"[[{t}]]" if trained else t for t, trained in pieces)


def legend(color: bool) -> str:
    if color:
        return f"legend: {GREEN}trained tokens{RESET}  {DIM}masked tokens (no loss){RESET}"
    return "legend: [[trained tokens]]  other text is masked (no loss)"


def format_report(r: dict[str, Any], max_length: int) -> str:
    """The report of ``sft data check`` as text."""
    lines = [f"rows: {r['rows']}  valid: {r['valid']}  invalid rows: {r['invalid_rows']}  skipped: {r['skipped']}"]
    for s in r["sources"]:
        lines.append(
            f"  {s['name']} ({s['format']}): {s['rows']} rows, {s['valid']} valid, {s['invalid']} invalid, "
            f"{s['used']} used  [{s['path']}]"
        )
    dedup = f" ({r['deduplicated']} removed)" if r["deduplicated"] else " (kept; data.dedup: true removes them)"
    lines.append(f"duplicates: {r['duplicates']}{dedup if r['duplicates'] else ''}")
    if r["held_out"]:
        lines.append(f"held out for eval (eval.split): {r['held_out']} (near-duplicate groups moved whole: "
                     f"{r.get('held_out_groups', 0)}; drawn rows kept in training because their prompt or reply "
                     f"overlaps a training row: {r.get('held_out_kept', 0)})")
    lines.append(
        f"examples: {r['examples']}  truncated: {r['truncated']}  dropped too long: {r['dropped_too_long']}"
        f"  dropped with nothing to train: {r['dropped_untrainable']}"
    )
    lines.append(
        f"tokens: {r['total_tokens']}  trained: {r['trained_tokens']} ({100 * r['trained_token_fraction']:.1f}%)"
    )
    if "length_percentiles" in r:
        lines.append("length: " + "  ".join(f"{k} {v}" for k, v in r["length_percentiles"].items()))
        lines += ["length histogram (tokens):"] + ["  " + h for h in r["length_histogram"]]
    if r.get("packing_efficiency") is not None:
        lines.append(
            f"packing: {r['packed_sequences']} sequences of {max_length} tokens, "
            f"efficiency {100 * r['packing_efficiency']:.1f}%"
        )
    if "estimated_steps" in r:
        lines.append(f"estimated optimizer steps: {r['estimated_steps']}")
    if r.get("lint"):
        lines += ["template warnings:"] + [f"  - {w}" for w in r["lint"]]
    if r["invalid"]:
        lines.append(f"problems ({len(r['invalid'])}):")
        lines += [f"  {p['file']}:{p['line']}: {p['error']}" for p in r["invalid"]]
    return "\n".join(lines)
