"""95% intervals for the figures of an eval result, from the per-row outcomes it keeps.

``add_intervals(result)`` fills ``result["intervals"]`` and ``result["n"]``, shaped like the
result itself (``intervals["forgetting"]["reference_perplexity"]``, ``intervals["accuracy_by_source"]
["eval.jsonl"]``):
- rates (task accuracy, stop rate, refusal, over-refusal, per-source accuracy): Wilson, n = rows;
- held-out loss and perplexity: bootstrap over examples of (CE sum / tokens), n = examples;
- mean response tokens: bootstrap over rows;
- reference perplexity and KL to base: bootstrap over the scored reference windows, n = windows.
Everything here is a pure function of the JSON, so ``sft compare`` and the reports read the same
numbers from any ``eval.json``, ``before.json`` or ``after.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sft.evaluation.result import EvalResult
from sft.evaluation.stats import bootstrap, mean_of, ratio, wilson

RATES = ("task_accuracy", "stop_rate", "refusal_rate", "over_refusal_rate", "constraint_rows_met",
         "tool_call_accuracy", "tool_name_accuracy", "tool_call_unparseable")


def row_key(source: str, line: int) -> str:
    """How a row is named in ``rows.key``: its file name and line, so results computed on other
    machines (other absolute paths) still pair.

    >>> row_key("/data/eval.jsonl", 12)
    'eval.jsonl:12'
    """
    return f"{Path(source).name or 'eval'}:{line}"


def bits(flags: Sequence[bool | None]) -> str:
    """Booleans as one character each: "1", "0", "-" for None.

    >>> bits([True, False, None])
    '10-'
    """
    return "".join("-" if f is None else "1" if f else "0" for f in flags)


def unbits(text: str) -> list[bool | None]:
    """The inverse of ``bits``.

    >>> unbits("10-")
    [True, False, None]
    """
    return [None if c == "-" else c == "1" for c in text]


def rate_flags(result: dict[str, Any], metric: str) -> list[bool | None]:
    """Per row: the outcome that ``metric`` (one of ``RATES`` or ``accuracy_by_source.<file>``)
    counts, None where the row does not count (a refusal rate only counts rows of its category).

    >>> r = {"rows": {"key": ["a.jsonl:1", "b.jsonl:1"], "correct": "10", "stopped": "11",
    ...               "category": "h-", "refused": "1-"}}
    >>> rate_flags(r, "refusal_rate"), rate_flags(r, "accuracy_by_source.b.jsonl")
    ([True, None], [None, False])
    """
    rows = result.get("rows") or {}
    n = len(rows.get("key") or [])
    if metric == "task_accuracy":
        return unbits(rows.get("correct", ""))
    if metric == "stop_rate":
        return unbits(rows.get("stopped", ""))
    if metric in ("refusal_rate", "over_refusal_rate"):
        want = "h" if metric == "refusal_rate" else "b"
        cats, refused = rows.get("category", "-" * n), unbits(rows.get("refused", "-" * n))
        return [r if c == want else None for c, r in zip(cats, refused)]
    if metric.startswith("accuracy_by_source."):
        name = metric.split(".", 1)[1]
        keys = rows.get("key") or []
        return [ok if k.rsplit(":", 1)[0] == name else None for k, ok in zip(keys, unbits(rows.get("correct", "")))]
    if metric in ("constraint_rows_met", "tool_call_accuracy", "tool_name_accuracy", "tool_call_unparseable"):
        return unbits(rows.get(metric, ""))  # rows without constraints / of other metrics are "-"
    raise KeyError(metric)


def _pair(lo_hi: tuple[float, float] | None, digits: int = 6) -> list[float] | None:
    return None if lo_hi is None else [round(lo_hi[0], digits), round(lo_hi[1], digits)]


def wilson_of(flags: Sequence[bool | None]) -> tuple[list[float] | None, int]:
    """(Wilson 95% interval, n) of the rows that count (not None).

    >>> wilson_of([True, False, None, True])
    ([0.20766, 0.938508], 3)
    """
    counted = [f for f in flags if f is not None]
    return _pair(wilson(sum(counted), len(counted))), len(counted)


def add_intervals(result: EvalResult) -> EvalResult:
    """``result`` with ``intervals`` and ``n`` filled from its ``rows``, ``losses`` and reference windows."""
    data: dict[str, Any] = dict(result)
    iv: dict[str, Any] = {}
    n: dict[str, Any] = {}
    rows = result.get("rows")
    if rows:
        for metric in RATES:
            if data.get(metric) is not None:
                iv[metric], n[metric] = wilson_of(rate_flags(data, metric))
        by_source_iv, by_source_n = {}, {}
        for name in result.get("accuracy_by_source") or {}:
            by_source_iv[name], by_source_n[name] = wilson_of(rate_flags(data, f"accuracy_by_source.{name}"))
        iv["accuracy_by_source"], n["accuracy_by_source"] = by_source_iv, by_source_n
        met, total = rows.get("constraints_met") or [], rows.get("constraints_total") or []
        if sum(total):  # resample rows (a row's constraints are not independent), not constraints
            has = [i for i, t in enumerate(total) if t]
            iv["constraint_share_met"] = _pair(bootstrap(ratio([met[i] for i in has], [total[i] for i in has]), len(has)))
            n["constraint_share_met"] = sum(total)
        tokens = rows.get("tokens") or []
        if tokens:
            iv["mean_response_tokens"] = _pair(bootstrap(mean_of(tokens), len(tokens)), 3)
            n["mean_response_tokens"] = len(tokens)
    losses = result.get("losses")
    if losses and sum(losses["tokens"]):
        nll, tok = losses["nll"], losses["tokens"]
        iv["eval_loss"] = _pair(bootstrap(ratio(nll, tok), len(nll)))
        iv["perplexity"] = _pair(bootstrap(ratio(nll, tok, math.exp), len(nll)))
        n["eval_loss"] = n["perplexity"] = len(nll)
    forgot = result.get("forgetting") or {}
    w_nll, w_tok = forgot.get("window_nll") or [], forgot.get("window_tokens") or []
    if w_nll and len(w_nll) == len(w_tok):
        iv["forgetting"] = {"reference_perplexity": _pair(bootstrap(ratio(w_nll, w_tok, math.exp), len(w_nll)))}
        n["forgetting"] = {"reference_perplexity": len(w_nll)}
        w_kl = forgot.get("window_kl") or []
        if len(w_kl) == len(w_tok):
            iv["forgetting"]["kl_to_base"] = _pair(bootstrap(ratio(w_kl, w_tok), len(w_kl)))
            n["forgetting"]["kl_to_base"] = len(w_kl)
    out: EvalResult = {**result, "intervals": iv, "n": n}
    return out
