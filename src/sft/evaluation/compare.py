"""`sft compare A.json B.json [C.json ...]`: is B really better than A, on the same rows?

Each later result is compared with the first, metric by metric, over the rows both evaluated
(paired by ``rows.key`` / ``losses.key``; reference windows by position):
- rates (task accuracy, stop rate, refusal, over-refusal, per-source accuracy): the exact
  McNemar test on the rows where the two disagree; the difference's interval is a paired bootstrap;
- held-out loss (per token), mean response tokens, reference perplexity and KL to base: a paired
  bootstrap over examples (or reference windows), which gives both the interval and the p-value.
The verdict is "better" / "worse" when p < 0.05 (in the metric's good direction), else "no
detectable difference at 95%". One test per metric, no correction for testing several: read a
lone p of 0.04 among ten metrics with care.

An argument may be an eval JSON (``sft eval``'s ``eval.json``, a run's ``before.json`` /
``after.json``) or a run directory (its ``after.json``; a single run directory alone compares
its ``before.json`` with its ``after.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sft.errors import SftError
from sft.evaluation.intervals import RATES, rate_flags
from sft.evaluation.stats import mcnemar, mean_of, paired, ratio, verdict

# (key, label, how to show it, higher is better?)
METRICS: list[tuple[str, str, str, bool | None]] = [
    ("task_accuracy", "task accuracy", "pct", True),
    ("stop_rate", "stop rate", "pct", True),
    ("refusal_rate", "refusal rate", "pct", True),
    ("over_refusal_rate", "over-refusal rate", "pct", False),
    ("constraint_rows_met", "constraints: rows with all met", "pct", True),
    ("constraint_share_met", "constraints: share met", "pct", True),
    ("tool_call_accuracy", "tool calls: right call", "pct", True),
    ("tool_name_accuracy", "tool calls: right function", "pct", True),
    ("tool_call_unparseable", "tool calls: unparseable", "pct", False),
    ("mean_response_tokens", "mean response tokens", "num1", None),
    ("eval_loss", "eval loss", "num4", False),
    ("forgetting.reference_perplexity", "reference perplexity", "num2", False),
    ("forgetting.kl_to_base", "KL to base", "num4", False),
]


def value_of(result: dict[str, Any], dotted: str) -> Any:
    """``result["a"]["b"]`` for "a.b"; a source name after ``accuracy_by_source.`` may hold dots.

    >>> value_of({"forgetting": {"kl_to_base": 0.1}}, "forgetting.kl_to_base")
    0.1
    >>> value_of({"accuracy_by_source": {"eval.jsonl": 0.5}}, "accuracy_by_source.eval.jsonl")
    0.5
    """
    if dotted.startswith("accuracy_by_source."):
        return (result.get("accuracy_by_source") or {}).get(dotted.split(".", 1)[1])
    node: Any = result
    for k in dotted.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _align(keys_a: list[str], keys_b: list[str]) -> list[tuple[int, int]]:
    """(index in A, index in B) of the rows both have, in A's order; by position when the keys
    are not unique (then both must list the same keys)."""
    if len(set(keys_a)) == len(keys_a) and len(set(keys_b)) == len(keys_b):
        where = {k: j for j, k in enumerate(keys_b)}
        return [(i, where[k]) for i, k in enumerate(keys_a) if k in where]
    return [(i, i) for i in range(len(keys_a))] if keys_a == keys_b else []


def _no_test(why: str) -> dict[str, Any]:
    return {"diff_interval": None, "p": None, "test": None, "n": 0, "verdict": why}


def _rate_test(a: dict[str, Any], b: dict[str, Any], metric: str, better: bool | None) -> dict[str, Any]:
    ka, kb = (a.get("rows") or {}).get("key"), (b.get("rows") or {}).get("key")
    if not ka or not kb:
        return _no_test("not paired: no per-row outcomes (re-run sft eval)")
    fa, fb = rate_flags(a, metric), rate_flags(b, metric)
    if len(fa) != len(ka) or len(fb) != len(kb):
        return _no_test("not paired: no per-row outcomes for this figure (re-run sft eval)")
    pairs = [(fa[i], fb[j]) for i, j in _align(ka, kb) if fa[i] is not None and fb[j] is not None]
    if not pairs:
        return _no_test("not paired: no rows in common")
    xa, xb = [bool(x) for x, _ in pairs], [bool(y) for _, y in pairs]
    only_a, only_b, p = mcnemar(xa, xb)
    diff, ci, _ = paired(mean_of([float(x) for x in xa]), mean_of([float(y) for y in xb]), len(pairs))
    return {"diff": diff, "diff_interval": _round(ci), "p": round(p, 6),
            "test": f"exact McNemar ({only_a} rows only A, {only_b} only B)", "n": len(pairs), "verdict": verdict(diff, p, better)}


def _boot_test(stat_a: Any, stat_b: Any, n: int, better: bool | None, what: str) -> dict[str, Any]:
    diff, ci, p = paired(stat_a, stat_b, n)
    if ci is None:
        return _no_test(f"not paired: {n} {what} in common")
    return {"diff": diff, "diff_interval": _round(ci), "p": round(p, 6), "test": f"paired bootstrap over {what}",
            "n": n, "verdict": verdict(diff, p, better)}


def _loss_test(a: dict[str, Any], b: dict[str, Any], better: bool | None) -> dict[str, Any]:
    la, lb = a.get("losses"), b.get("losses")
    if not la or not lb:
        return _no_test("not paired: no per-example losses (re-run sft eval)")
    pairs = _align(la["key"], lb["key"])
    if [la["tokens"][i] for i, _ in pairs] != [lb["tokens"][j] for _, j in pairs]:
        return _no_test("not paired: the examples have other token counts (another tokenizer or template?)")
    ia, ib = [i for i, _ in pairs], [j for _, j in pairs]
    return _boot_test(ratio([la["nll"][i] for i in ia], [la["tokens"][i] for i in ia]),
                      ratio([lb["nll"][j] for j in ib], [lb["tokens"][j] for j in ib]), len(pairs), better, "examples")


def _constraint_share_test(a: dict[str, Any], b: dict[str, Any], better: bool | None) -> dict[str, Any]:
    ra, rb = a.get("rows") or {}, b.get("rows") or {}
    if not ra.get("constraints_met") or not rb.get("constraints_met"):
        return _no_test("not paired: no per-row constraint counts (re-run sft eval)")
    pairs = [(i, j) for i, j in _align(ra["key"], rb["key"]) if ra["constraints_total"][i] and rb["constraints_total"][j]]
    ia, ib = [i for i, _ in pairs], [j for _, j in pairs]
    return _boot_test(ratio([ra["constraints_met"][i] for i in ia], [ra["constraints_total"][i] for i in ia]),
                      ratio([rb["constraints_met"][j] for j in ib], [rb["constraints_total"][j] for j in ib]),
                      len(pairs), better, "rows")


def _window_test(a: dict[str, Any], b: dict[str, Any], field: str, transform: Any, better: bool | None) -> dict[str, Any]:
    fa, fb = a.get("forgetting") or {}, b.get("forgetting") or {}
    if not fa.get(field) or not fb.get(field) or not fa.get("window_tokens"):
        return _no_test("not paired: no per-window values (re-run sft eval)")
    if fa.get("reference_sha256") != fb.get("reference_sha256"):
        return _no_test("not paired: another reference text")
    if fa.get("window_tokens") != fb.get("window_tokens"):
        return _no_test(f"not paired: other reference windows ({len(fa['window_tokens'])} against "
                        f"{len(fb.get('window_tokens') or [])}: another eval.reference_tokens or tokenizer)")
    tok = fa["window_tokens"]
    return _boot_test(ratio(fa[field], tok, transform), ratio(fb[field], tok, transform), len(tok), better,
                      "reference windows")


def _round(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [round(ci[0], 6), round(ci[1], 6)]


def compare_two(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per metric that both results report: values, their intervals, B - A with its
    paired interval, p, the test used, the paired n and the verdict. When paired, B - A is over
    the n rows both evaluated (what its interval, p and verdict are about), which may differ from
    ``b - a`` when one result has rows the other has not (``paired_rows``)."""
    metrics = list(METRICS)
    for name in (a.get("accuracy_by_source") or {}):
        if name in (b.get("accuracy_by_source") or {}) and len(a.get("accuracy_by_source") or {}) > 1:
            metrics.append((f"accuracy_by_source.{name}", f"accuracy {name}", "pct", True))
    out = []
    for key, label, how, better in metrics:
        va, vb = value_of(a, key), value_of(b, key)
        if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
            continue
        if key in RATES or key.startswith("accuracy_by_source."):
            test = _rate_test(a, b, key, better)
        elif key == "eval_loss":
            test = _loss_test(a, b, better)
        elif key == "mean_response_tokens":
            ra, rb = a.get("rows") or {}, b.get("rows") or {}
            pairs = _align(ra.get("key") or [], rb.get("key") or [])
            ta, tb = ra.get("tokens") or [], rb.get("tokens") or []
            test = (_boot_test(mean_of([float(ta[i]) for i, _ in pairs]), mean_of([float(tb[j]) for _, j in pairs]),
                               len(pairs), better, "rows") if ta and tb else _no_test("not paired: no per-row lengths"))
        elif key == "constraint_share_met":
            test = _constraint_share_test(a, b, better)
        elif key == "forgetting.reference_perplexity":
            test = _window_test(a, b, "window_nll", math.exp, better)
        else:
            test = _window_test(a, b, "window_kl", float, better)
        out.append({"metric": key, "label": label, "how": how, "a": va, "b": vb, "diff": vb - va,  # a test's own diff wins
                    "a_interval": value_of(a.get("intervals") or {}, key),
                    "b_interval": value_of(b.get("intervals") or {}, key), **test})
    return out


def paired_rows(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """A note when A and B evaluated different rows: the paired figures are over the common ones.

    >>> paired_rows({"rows": {"key": ["e:1", "e:2"]}}, {"rows": {"key": ["e:1", "e:2", "e:3"]}})
    '2 rows in common (A has 2, B 3): B - A, its interval and p are over those; A and B are over all their own rows'
    >>> paired_rows({"rows": {"key": ["e:1"]}}, {"rows": {"key": ["e:1"]}}) is None
    True
    """
    ka, kb = (a.get("rows") or {}).get("key") or [], (b.get("rows") or {}).get("key") or []
    common = len(_align(ka, kb))
    if not ka or not kb or not common or (common == len(ka) == len(kb)):
        return None
    return (f"{common} rows in common (A has {len(ka)}, B {len(kb)}): B - A, its interval and p are over those; "
            "A and B are over all their own rows")


def load_result(arg: str) -> tuple[str, dict[str, Any]]:
    """(label, eval result) for a JSON file or a run directory (its after.json, else eval.json)."""
    path = Path(arg)
    if path.is_dir():
        for name in ("after.json", "eval.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise SftError(f"{arg}: a directory without after.json or eval.json; give an eval JSON "
                           "(sft eval --out FILE.json) or a finished run's directory")
    if not path.is_file():
        raise SftError(f"{arg}: no such file; give eval JSONs (eval.json, before.json, after.json) or run directories")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SftError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); give an eval result written by sft") from None
    if not isinstance(data, dict) or not any(k in data for k in ("task_accuracy", "eval_loss", "forgetting")):
        raise SftError(f"{path}: not an eval result (no task_accuracy, eval_loss or forgetting); "
                       "give sft eval's JSON or a run's before.json / after.json")
    return str(path), data


def _cell(value: Any, how: str, interval: Any) -> str:
    from sft.reporting.report import fmt, fmt_interval

    return fmt(value, how) + (f" {fmt_interval(interval, how)}" if interval else "")


def table_rows(label_b: str, rows: list[dict[str, Any]]) -> list[list[str]]:
    """[metric, B, A, B - A [interval], p, verdict] rows of ``compare_two``'s output, as text."""
    from sft.reporting.report import fmt_change, fmt_interval

    out = []
    for r in rows:
        p = "-" if r["p"] is None else ("<0.001" if r["p"] < 0.001 else f"{r['p']:.3f}")
        change = fmt_change(r["diff"], r["how"]) + (f" {fmt_interval(r['diff_interval'], r['how'], True)}"
                                                   if r["diff_interval"] else "")
        out.append([r["label"], label_b, _cell(r["a"], r["how"], r["a_interval"]),
                    _cell(r["b"], r["how"], r["b_interval"]), change, p, r["verdict"]])
    return out


def run_compare(paths: list[str], as_json: bool = False) -> int:
    """Print (or, with ``as_json``, write to stdout as JSON) every result against the first."""
    from sft.reporting.report import print_table

    if len(paths) == 1 and Path(paths[0]).is_dir() and (Path(paths[0]) / "before.json").is_file():
        paths = [str(Path(paths[0]) / "before.json"), str(Path(paths[0]) / "after.json")]
    if len(paths) < 2:
        raise SftError("compare: give at least two eval results (or one run directory with before.json and after.json)")
    results = [load_result(p) for p in paths]
    base_label, base = results[0]
    report: dict[str, Any] = {"baseline": base_label,
              "comparisons": [{"against": label, "metrics": compare_two(base, r)} for label, r in results[1:]]}
    if as_json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"A = {base_label}")
    rows: list[list[str]] = []
    for n, c in enumerate(report["comparisons"], 1):
        tag = "B" if len(results) == 2 else f"B{n}"
        print(f"{tag} = {c['against']}")
        rows += table_rows(tag, c["metrics"])
    print()
    print_table(["metric", "vs", "A [95% CI]", "B [95% CI]", "B - A [95% CI]", "p", "verdict"], rows)
    for n, (_, r) in enumerate(results[1:], 1):
        note = paired_rows(base, r)
        if note:
            print(f"{'B' if len(results) == 2 else f'B{n}'}: {note}")
    return 0
