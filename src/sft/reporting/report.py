"""The run report: ``report.md`` and ``report.html`` (one self-contained file, inline SVG plots).

Everything is drawn by hand as SVG polylines so the report opens offline, in any browser, with
no JavaScript and no plotting library.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from sft.atomic import atomic_write_text

NOTE = ("Intervals are 95%: Wilson for rates, bootstrap over examples (or reference windows) for losses. "
        "The change is tested on the same rows: exact McNemar for rates, paired bootstrap otherwise "
        "(sft compare before.json after.json).")

# (key in the eval dict, label, how to show it, higher is better?)
ROWS: list[tuple[str, str, str, bool | None]] = [
    ("task_accuracy", "task accuracy", "pct", True),
    ("tool_call_accuracy", "tool call accuracy (function and arguments)", "pct", True),
    ("tool_name_accuracy", "tool name accuracy (function)", "pct", True),
    ("tool_call_unparseable", "unparseable tool calls", "pct", False),
    ("stop_rate", "stop rate", "pct", True),
    ("refusal_rate", "refusal rate (harmful requests declined)", "pct", True),
    ("over_refusal_rate", "over-refusal rate (benign requests declined)", "pct", False),
    ("constraint_rows_met", "constraints: rows with all met", "pct", True),
    ("constraint_share_met", "constraints: share of checks met", "pct", True),
    ("mean_response_tokens", "mean response tokens", "num1", None),
    ("eval_loss", "eval loss", "num4", False),
    ("perplexity", "perplexity", "num2", False),
    ("forgetting.reference_perplexity", "reference perplexity (forgetting)", "num2", False),
    ("forgetting.kl_to_base", "KL to base, nats/token (forgetting)", "num4", False),
]


def _get(d: dict[str, Any] | None, dotted: str) -> Any:
    node: Any = d
    for k in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(k)
    return node


def fmt(value: Any, how: str = "num") -> str:
    """A metric as text: ``pct`` (share as percent), ``signed_pct`` (relative change), ``time``
    (seconds), ``numN`` (N decimals) or ``num`` (4 significant digits); None or NaN is ``-``.

    >>> fmt(0.5, "pct"), fmt(1.23456, "num2"), fmt(None, "pct"), fmt(0.052, "signed_pct")
    ('50.0%', '1.23', '-', '+5.2%')
    >>> fmt(12.3456, "num"), fmt(61.2, "time"), fmt(float("nan")), fmt("x")
    ('12.35', '61s', '-', 'x')
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    if how == "pct":
        return f"{100 * value:.1f}%"
    if how == "signed_pct":
        return f"{value:+.1%}"
    if how == "time":
        return f"{value:.0f}s"
    if how == "num":
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{value:.{int(how[-1])}f}"


def fmt_interval(interval: Any, how: str = "num", signed: bool = False) -> str:
    """A 95% interval as text, in the value's format; signed for a difference.

    >>> fmt_interval([0.657, 0.8245], "pct"), fmt_interval([-0.1, 0.02], "pct", signed=True)
    ('[65.7, 82.5]%', '[-10.0, +2.0] pts')
    >>> fmt_interval([1.2, 1.31], "num2"), fmt_interval(None, "pct")
    ('[1.20, 1.31]', '')
    """
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in interval):
        return ""
    lo, hi = interval
    if how == "pct":
        spec = "+.1f" if signed else ".1f"
        return f"[{100 * lo:{spec}}, {100 * hi:{spec}}]" + (" pts" if signed else "%")
    digits = int(how[-1]) if how[-1].isdigit() else 3
    spec = f"+.{digits}f" if signed else f".{digits}f"
    return f"[{lo:{spec}}, {hi:{spec}}]"


def fmt_change(diff: Any, how: str) -> str:
    """B - A as text: points for a rate.

    >>> fmt_change(0.6, "pct"), fmt_change(-0.01234, "num4")
    ('+60.0 pts', '-0.0123')
    """
    if not isinstance(diff, (int, float)):
        return "-"
    return f"{100 * diff:+.1f} pts" if how == "pct" else f"{diff:+.{int(how[-1]) if how[-1].isdigit() else 3}f}"


def with_interval(result: dict[str, Any] | None, key: str, how: str) -> str:
    """A figure of an eval result and its 95% interval (``result["intervals"]``, same shape).

    >>> with_interval({"task_accuracy": 0.75, "intervals": {"task_accuracy": [0.657, 0.8245]}}, "task_accuracy", "pct")
    '75.0% [65.7, 82.5]%'
    """
    value = _get(result, key)
    interval = fmt_interval(_get((result or {}).get("intervals"), key), how)
    return fmt(value, how) + (f" {interval}" if interval and value is not None else "")


def p_text(p: Any) -> str:
    """A p-value as text.

    >>> p_text(0.0004), p_text(0.0312), p_text(None)
    ('<0.001', '0.031', '-')
    """
    if not isinstance(p, (int, float)):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def before_after_rows(before: dict[str, Any] | None, after: dict[str, Any] | None,
                      comparison: list[dict[str, Any]] | None = None) -> list[list[str]]:
    """[metric, before, after, change, p, verdict] rows for the table; values carry their 95%
    intervals, and ``comparison`` (``sft.evaluation.compare.compare_two(before, after)``) gives
    the change's paired interval, p-value and verdict.

    >>> before_after_rows({"task_accuracy": 0.1}, {"task_accuracy": 0.7})[0]
    ['task accuracy', '10.0%', '70.0%', '+60.0 pts', '-', '-']
    """
    tests = {c["metric"]: c for c in comparison or []}
    rows = []
    for key, label, how, _ in ROWS:
        b, a = _get(before, key), _get(after, key)
        if b is None and a is None:
            continue
        change = "-"
        if isinstance(b, (int, float)) and isinstance(a, (int, float)):
            change = fmt_change(a - b, how)
        t = tests.get(key) or {}
        if t.get("diff_interval"):
            change += " " + fmt_interval(t["diff_interval"], how, signed=True)
        rows.append([label, with_interval(before, key, how), with_interval(after, key, how), change,
                     p_text(t.get("p")), str(t.get("verdict", "-"))])
    return rows


BA_HEADER = ["metric", "before [95% CI]", "after [95% CI]", "change [95% CI]", "p", "verdict"]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Aligned columns on the terminal: the first left, the others right."""
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def print_before_after(before: dict[str, Any], after: dict[str, Any],
                       comparison: list[dict[str, Any]] | None = None) -> None:
    """The table `make demo` prints at the end."""
    print_table(BA_HEADER, before_after_rows(before, after, comparison))


# ---------------------------------------------------------------------------------------------
# SVG line charts


def svg_chart(series: dict[str, list[tuple[float, float]]], title: str, y_label: str = "",
              width: int = 560, height: int = 260, log_y: bool = False) -> str:
    """An inline SVG line chart of one or more (x, y) series; empty series are skipped.

    >>> svg = svg_chart({"loss": [(1, 2.0), (2, 1.0)]}, "loss")
    >>> svg.startswith("<svg") and "<polyline" in svg
    True
    """
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    pts = {k: [(x, y) for x, y in v if math.isfinite(y) and (y > 0 or not log_y)] for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    esc = html.escape
    head = f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
    head += f'<title>{esc(title)}</title><rect width="100%" height="100%" fill="white"/>'
    head += f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-family="sans-serif">{esc(title)}</text>'
    if not pts:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12">no data</text></svg>'
    left, right, top, bottom = 60, 16, 28, 36
    xs = [x for v in pts.values() for x, _ in v]
    ys = [math.log10(y) if log_y else y for v in pts.values() for _, y in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 1, y1 + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        v = math.log10(y) if log_y else y
        return top + (y1 - v) / (y1 - y0) * (height - top - bottom)

    parts = [head]
    axis = 'stroke="#444" stroke-width="1"'
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" {axis}/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" {axis}/>')
    for i in range(5):  # y ticks
        v = y0 + (y1 - y0) * i / 4
        shown = 10**v if log_y else v
        y = top + (y1 - v) / (y1 - y0) * (height - top - bottom)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10" '
                     f'font-family="sans-serif">{shown:.3g}</text>')
    for i in range(5):  # x ticks
        v = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(v):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10" '
                     f'font-family="sans-serif">{v:.4g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle" font-size="11" '
                 f'font-family="sans-serif">step</text>')
    if y_label:
        parts.append(f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle" '
                     f'font-size="11" font-family="sans-serif">{esc(y_label)}</text>')
    for n, (name, line) in enumerate(pts.items()):
        c = colours[n % len(colours)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        if len(line) > 1:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{coords}"/>')
        if len(line) <= 30:  # dots for sparse series (eval points), so a single point shows
            parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"/>' for x, y in line)
        parts.append(f'<text x="{width - right - 4}" y="{top + 14 + 14 * n}" text-anchor="end" font-size="11" '
                     f'fill="{c}" font-family="sans-serif">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _series(metrics: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in metrics
            if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]


def charts(metrics: list[dict[str, Any]]) -> list[str]:
    """The SVG plots of a run: loss (train and eval), learning rate, gradient norm."""
    train_rows = [r for r in metrics if "loss" in r]
    eval_rows = [r for r in metrics if "eval_loss" in r]
    dev_rows = [r for r in metrics if "dev_loss" in r]
    out = [svg_chart({"train loss": _series(train_rows, "loss"), "eval loss": _series(eval_rows, "eval_loss"),
                      "dev loss": _series(dev_rows, "dev_loss")}, "loss over steps", "loss")]
    out.append(svg_chart({"lr": _series(train_rows, "lr")}, "learning rate", "lr"))
    if any("grad_norm" in r for r in train_rows):
        out.append(svg_chart({"grad norm": _series(train_rows, "grad_norm")}, "gradient norm", "norm"))
    return out


# ---------------------------------------------------------------------------------------------
# the two files


def md_table(rows: list[list[str]], header: list[str]) -> str:
    def cell(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(rows: list[list[str]], header: list[str]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short(text: Any, n: int = 300) -> str:
    s = str(text)
    return s if len(s) <= n else s[: n - 1] + "…"


def sample_rows(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[list[str]]:
    """[prompt, reference, before reply, after reply] for the sample generations, side by side."""
    b = (before or {}).get("samples") or []
    a = (after or {}).get("samples") or []

    def reply(s: dict[str, Any] | None) -> str:
        if not s:
            return "-"
        mark = "✓" if s.get("correct") else "✗"
        stop = "" if s.get("stopped") else " [no stop]"
        return f"{mark} {_short(s.get('reply', ''))}{stop}"

    rows = []
    for i in range(max(len(a), len(b))):
        first = (a[i] if i < len(a) else b[i])
        rows.append([_short(first.get("prompt", "")), _short(first.get("reference", "")),
                     reply(b[i] if i < len(b) else None), reply(a[i] if i < len(a) else None)])
    return rows


def quality_line(counts: dict[str, Any], dropped: dict[str, Any] | None = None) -> str:
    """The run report's line of ``sft data check``'s quality counts (and what data.quality.drop removed).

    >>> quality_line({"near_duplicates": 3, "contamination": 0}, {"near_duplicates": 3})
    'near_duplicates 3 (3 dropped), contamination 0'
    """
    return ", ".join(f"{k} {n}" + (f" ({(dropped or {})[k]} dropped)" if (dropped or {}).get(k) else "")
                     for k, n in counts.items())


def select_rows(sel: dict[str, Any]) -> list[list[str]]:
    """The run report's rows of ``data.select``: what was kept and dropped, with a few rows of each.

    >>> select_rows({"by": "ifd", "rows": 10, "kept": 2, "dropped": {"ifd_above": 1, "not_selected": 7},
    ...              "kept_examples": [{"row": "a:1", "ifd": 0.9, "eot_prob": 0.8, "text": "Paris."}],
    ...              "dropped_examples": [{"row": "a:2", "ifd": 1.3, "eot_prob": 0.7, "text": "Blue.", "reason": "ifd_above"}]})[0]
    ['select (sft data score)', 'kept 2 of 10 rows by ifd; dropped: ifd_above 1, not_selected 7']
    """
    dropped = ", ".join(f"{k} {n}" for k, n in sel.get("dropped", {}).items())
    rows = [["select (sft data score)", f"kept {sel.get('kept')} of {sel.get('rows')} rows by {sel.get('by')}; dropped: {dropped}"]]
    for name, key in (("select: kept, e.g.", "kept_examples"), ("select: dropped, e.g.", "dropped_examples")):
        for ex in sel.get(key, []):
            why = f"{ex['reason']}, " if ex.get("reason") else ""
            rows.append([name, _short(f"{ex['row']} ({why}ifd {fmt(ex.get('ifd'), 'num4')}, end-of-turn "
                                      f"{fmt(ex.get('eot_prob'), 'num4')}): {ex.get('text', '')}", 200)])
    return rows


def _data_rows(data_report: dict[str, Any] | None) -> list[list[str]]:
    rows = []
    for k, v in (data_report or {}).items():
        if k == "quality_dropped" or (k == "select" and not v):
            continue  # shown within the quality line; no data.select
        if k == "select" and isinstance(v, dict):
            rows += select_rows(v)
            continue
        if k == "quality_counts" and isinstance(v, dict):
            rows.append(["quality (sft data check)", quality_line(v, (data_report or {}).get("quality_dropped"))])
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, ensure_ascii=False)
        rows.append([str(k), _short(v, 200)])
    return rows


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f4f4f4}pre{background:#f7f7f7;padding:1em;overflow:auto;
font-size:12px}.plots svg{margin:0.5em;border:1px solid #eee}"""


def write_report(
    output_dir: Path,
    cfg_dict: dict[str, Any],
    metrics: list[dict[str, Any]],
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    data_report: dict[str, Any] | None,
    comparison: list[dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` into ``output_dir``."""
    import yaml

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    title = f"sft report: {cfg_dict.get('model', '?')} -> {cfg_dict.get('output_dir', output_dir)}"
    cfg_text = yaml.safe_dump(cfg_dict, sort_keys=False)
    train_rows = [r for r in metrics if "loss" in r]
    last = train_rows[-1] if train_rows else {}
    run_rows = [[k, fmt(last.get(k), "num4") if k in ("loss", "grad_norm") else str(last.get(k, "-"))]
                for k in ("step", "loss", "tokens", "trained_tokens", "elapsed_s") if k in last]
    ba_header = BA_HEADER
    ba_rows = before_after_rows(before, after, comparison)
    s_header = ["prompt", "reference", "before", "after"]
    s_rows = sample_rows(before, after)
    d_rows = _data_rows(data_report)
    plots = charts(metrics)

    md = [f"# {title}", ""]
    if ba_rows:
        md += ["## Before / after", "", md_table(ba_rows, ba_header), "", NOTE, ""]
    if run_rows:
        md += ["## Training", "", md_table(run_rows, ["", "last step"]), "",
               "Loss and learning-rate curves are in report.html.", ""]
    if s_rows:
        md += ["## Sample generations", "", md_table(s_rows, s_header), ""]
    if d_rows:
        md += ["## Data", "", md_table(d_rows, ["statistic", "value"]), ""]
    md += ["## Config", "", "```yaml", cfg_text.rstrip(), "```", ""]

    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    if ba_rows:
        body += ["<h2>Before / after</h2>", html_table(ba_rows, ba_header), f"<p>{html.escape(NOTE)}</p>"]
    body += ["<h2>Training</h2>", f'<div class="plots">{"".join(plots)}</div>']
    if run_rows:
        body.append(html_table(run_rows, ["", "last step"]))
    if s_rows:
        body += ["<h2>Sample generations</h2>", html_table(s_rows, s_header)]
    if d_rows:
        body += ["<h2>Data</h2>", html_table(d_rows, ["statistic", "value"])]
    body += ["<h2>Config</h2>", f"<pre>{esc(cfg_text)}</pre>"]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")

    html_path, md_path = output_dir / "report.html", output_dir / "report.md"
    atomic_write_text(html_path, page)  # a crash leaves the old report or the new one, never half
    atomic_write_text(md_path, "\n".join(md))
    return html_path, md_path
