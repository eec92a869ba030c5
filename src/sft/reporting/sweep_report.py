"""The sweep's results: one summary dict per trial (read from its run directory), the choice of
the best trial under the forgetting budget (with a verdict for every other one), and the three
report files ``sweep.json``, ``sweep.md`` and ``sweep.html`` (self-contained, inline SVG)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft.atomic import atomic_write_text
from sft.errors import SftError
from sft.reporting.report import CSS, fmt, html_table, md_table, svg_chart

OBJECTIVES = {"task_accuracy": "higher", "eval_loss": "lower"}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def relative_forgetting(before: dict[str, Any] | None, after: dict[str, Any] | None) -> float | None:
    """Relative rise of reference perplexity from the starting model to the trained one.

    >>> relative_forgetting({"forgetting": {"reference_perplexity": 20.0}}, {"forgetting": {"reference_perplexity": 22.0}})
    0.1
    >>> relative_forgetting(None, {"forgetting": {"reference_perplexity": 22.0}}) is None
    True
    """
    b = _num(((before or {}).get("forgetting") or {}).get("reference_perplexity"))
    a = _num(((after or {}).get("forgetting") or {}).get("reference_perplexity"))
    if a is None or b is None or b <= 0:
        return None
    return round(a / b - 1.0, 6)


def summarize_trial(trial_dir: Path, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Everything the choice and the report need about one trial, from its files."""
    state = read_json(trial_dir / "trial.json") or {}
    metrics = read_metrics(trial_dir / "metrics.jsonl")
    before, after = read_json(trial_dir / "before.json"), read_json(trial_dir / "after.json")
    losses = [(int(r["step"]), float(r["loss"])) for r in metrics if "loss" in r]
    evals = [float(r["eval_loss"]) for r in metrics if _num(r.get("eval_loss")) is not None]
    final_eval = _num((after or {}).get("eval_loss"))
    if final_eval is None and evals and (trial_dir / "run_state.json").exists():
        final_eval = evals[-1]
    if final_eval is not None:
        evals.append(final_eval)
    if (trial_dir / "run_state.json").exists():
        status = "finished"
    else:
        status = state.get("status") or ("interrupted" if losses else "pending")
    elapsed = [float(r["elapsed_s"]) for r in metrics if "elapsed_s" in r]
    return {
        "name": name,
        "params": params,
        "status": status,
        "reason": state.get("reason"),
        "steps": losses[-1][0] if losses else 0,
        "final_loss": losses[-1][1] if losses else None,
        "final_eval_loss": final_eval,
        "best_eval_loss": min(evals) if evals else None,
        "eval_loss": final_eval,
        "task_accuracy": _num((after or {}).get("task_accuracy")),
        "stop_rate": _num((after or {}).get("stop_rate")),
        "forgetting": relative_forgetting(before, after),
        "reference_perplexity": _num(((after or {}).get("forgetting") or {}).get("reference_perplexity")),
        "kl_to_base": _num(((after or {}).get("forgetting") or {}).get("kl_to_base")),
        "time_s": _num(state.get("wall_s")) or (elapsed[-1] if elapsed else None),
        "output_dir": str(trial_dir),
        "loss_curve": losses,
    }


# ---------------------------------------------------------------------------------------------
# choice: the best trial within the forgetting budget, and why each other one lost


def _better(a: float, b: float, direction: str) -> bool:
    return a > b if direction == "higher" else a < b


def choose(trials: list[dict[str, Any]], objective: str, max_forgetting: float | None,
           paired_p: Callable[[str, str], float | None] | None = None) -> tuple[str | None, dict[str, str]]:
    """The winning trial's name and, for every trial, a one-line verdict.

    A trial needs ``status == "finished"``, a measured objective, and (with a budget) a
    ``forgetting`` (relative rise of reference perplexity) at most ``max_forgetting``.
    ``paired_p(a, b)``: the p-value of a paired test of the objective between trials a and b on
    the same rows (``sft compare``'s); trials not detectably different from the best one
    (p >= 0.05) are ties, and of the tied trials the one that forgets least is chosen.

    >>> ts = [{"name": "a", "status": "finished", "task_accuracy": 0.9, "forgetting": 0.30},
    ...       {"name": "b", "status": "finished", "task_accuracy": 0.7, "forgetting": 0.05},
    ...       {"name": "c", "status": "pruned", "reason": "diverged: loss is nan at step 4"}]
    >>> best, why = choose(ts, "task_accuracy", 0.10)
    >>> best, why["a"], why["c"]
    ('b', 'over the forgetting budget: reference perplexity +30.0% > +10.0%', 'pruned: diverged: loss is nan at step 4')
    """
    if objective not in OBJECTIVES:
        raise SftError(f"sweep.objective: {objective!r} is not supported; use one of {', '.join(OBJECTIVES)}")
    direction = OBJECTIVES[objective]
    why: dict[str, str] = {}
    ok: list[dict[str, Any]] = []
    for t in trials:
        name, status, value = t["name"], t.get("status"), t.get(objective)
        if status == "pruned":
            why[name] = f"pruned: {t.get('reason')}"
        elif status == "failed":
            why[name] = f"failed: {t.get('reason')}"
        elif status != "finished":
            why[name] = f"not finished ({status}); re-run the sweep to complete it"
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            why[name] = f"no {objective} measured (it needs eval data: eval.data or eval.split)"
        elif max_forgetting is not None and not isinstance(t.get("forgetting"), (int, float)):
            why[name] = "forgetting not measured, so the budget cannot be checked"
        elif max_forgetting is not None and t["forgetting"] > max_forgetting:
            why[name] = (f"over the forgetting budget: reference perplexity {t['forgetting']:+.1%} "
                         f"> {max_forgetting:+.1%}")
        else:
            ok.append(t)
    if not ok:
        return None, why
    best = ok[0]
    for t in ok[1:]:  # ties go to the trial that forgets less, then to the earlier one
        if _better(t[objective], best[objective], direction) or (
            t[objective] == best[objective] and (t.get("forgetting") or 0.0) < (best.get("forgetting") or 0.0)
        ):
            best = t
    top = best
    p_top: dict[str, float] = {}
    if paired_p is not None:  # not detectably worse than the top trial: a tie, broken by less forgetting
        for t in ok:
            p = paired_p(top["name"], t["name"]) if t is not top else None
            if p is not None and p >= 0.05:
                p_top[t["name"]] = p
                if (t.get("forgetting") or 0.0) < (best.get("forgetting") or 0.0):
                    best = t
    for t in ok:
        if t is best and best is not top:
            why[t["name"]] = (f"chosen: {objective} {best[objective]:.4g} is not detectably different from the "
                              f"top {top[objective]:.4g} ({top['name']}, p={p_top[t['name']]:.2f}) and it forgets less")
        elif t is best:
            why[t["name"]] = f"chosen: best {objective} ({best[objective]:.4g})" + (
                f" within the forgetting budget ({max_forgetting:+.1%})" if max_forgetting is not None else "")
        elif t["name"] in p_top or (t is top and paired_p is not None):
            why[t["name"]] = (f"tied on {objective} with {best['name']} (no detectable difference at 95%), "
                              "which forgets less")
        elif paired_p is not None and t[objective] != best[objective]:
            word = "lower" if direction == "higher" else "higher"
            p = paired_p(top["name"], t["name"])
            why[t["name"]] = (f"{word} {objective}: {t[objective]:.4g} vs {top[objective]:.4g} ({top['name']})"
                              + (f", p={p:.3f}" if p is not None else ""))
        elif t[objective] == best[objective]:
            why[t["name"]] = (f"tied on {objective} ({t[objective]:.4g}) with {best['name']}, "
                              "which forgets less or comes first in the grid")
        else:
            word = "lower" if direction == "higher" else "higher"
            why[t["name"]] = f"{word} {objective}: {t[objective]:.4g} vs {best[objective]:.4g} ({best['name']})"
    return best["name"], why


# ---------------------------------------------------------------------------------------------
# rendering


HEADER = ["trial", "status", "final loss", "final eval loss", "best eval loss", "task accuracy", "stop rate",
          "forgetting", "KL to base", "time", "verdict"]


def table_rows(trials: list[dict[str, Any]], why: dict[str, str]) -> list[list[str]]:
    return [[t["name"], t["status"], fmt(t["final_loss"]), fmt(t["final_eval_loss"]), fmt(t["best_eval_loss"]),
             fmt(t["task_accuracy"]), fmt(t["stop_rate"]), fmt(t["forgetting"], "signed_pct"), fmt(t["kl_to_base"]),
             fmt(t["time_s"], "time"), why.get(t["name"], "")] for t in trials]


def svg_scatter(points: list[tuple[str, float, float]], budget: float | None, chosen: str | None,
                width: int = 560, height: int = 300) -> str:
    """Task accuracy (y) against forgetting (x, relative) with one point per trial, the budget as a
    dashed vertical line and the chosen trial ringed.

    >>> svg = svg_scatter([("lr=1e-05", 0.02, 0.5), ("lr=1e-04", 0.2, 0.7)], 0.1, "lr=1e-05")
    >>> svg.startswith("<svg") and svg.count("<circle") == 3 and "budget" in svg
    True
    """
    esc = html.escape
    title = "task accuracy vs forgetting"
    head = (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img"><title>{title}</title>'
            f'<rect width="100%" height="100%" fill="white"/><text x="{width / 2}" y="16" text-anchor="middle" '
            f'font-size="13" font-family="sans-serif">{title}</text>')
    if not points:
        return head + (f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12">'
                       "no trial has both task accuracy and forgetting</text></svg>")
    left, right, top, bottom = 60, 20, 28, 40
    xs = [p[1] for p in points] + ([budget] if budget is not None else []) + [0.0]
    x0, x1 = min(xs), max(xs)
    pad = (x1 - x0) * 0.1 or 0.05
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = 0.0, 1.0

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [head, f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="10" '
                     f'font-family="sans-serif">{y:.2f}</text>')
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10" '
                     f'font-family="sans-serif">{x:+.0%}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" font-size="11" '
                 'font-family="sans-serif">forgetting (rise of reference perplexity)</text>')
    parts.append(f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle" '
                 'font-size="11" font-family="sans-serif">task accuracy</text>')
    if budget is not None:
        bx = sx(budget)
        parts.append(f'<line x1="{bx:.1f}" y1="{top}" x2="{bx:.1f}" y2="{height - bottom}" stroke="#d62728" '
                     'stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{bx + 3:.1f}" y="{top + 10}" font-size="10" fill="#d62728" '
                     f'font-family="sans-serif">budget {budget:+.0%}</text>')
    for name, x, y in points:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="#1f77b4"><title>{esc(name)}</title></circle>')
        parts.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}" font-size="10" '
                     f'font-family="sans-serif">{esc(name)}</text>')
        if name == chosen:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="9" fill="none" stroke="#2ca02c" '
                         'stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def selection_note(sets: list[str], n_trials: int) -> str:
    """Says plainly that the trials are chosen on the same eval set whose figures are reported.

    >>> selection_note(["eval.jsonl"], 4)
    'Chosen on eval.jsonl, the same set the figures below are measured on: the chosen trial is the best of 4 on it, so its figures are optimistic; measure it on data no trial was chosen on (sft eval CONFIG --model TRIAL/final --eval.data=test.jsonl) for an unbiased figure.'
    """
    where = " + ".join(sets) or "the eval set"
    return (f"Chosen on {where}, the same set the figures below are measured on: the chosen trial is the best "
            f"of {n_trials} on it, so its figures are optimistic; measure it on data no trial was chosen on "
            "(sft eval CONFIG --model TRIAL/final --eval.data=test.jsonl) for an unbiased figure.")


def dev_note(sets: list[str], chosen: str | None, test: dict[str, Any] | None) -> str:
    """Says what the choice saw (dev) and what the test figures are.

    >>> dev_note(["eval.dev_split 0.05 of the training rows"], "lr=1e-05", None)
    'Chosen on the dev set (eval.dev_split 0.05 of the training rows); no trial saw the test rows. No test figures: set eval.data or eval.split.'
    """
    where = " + ".join(sets) or "the dev set"
    text = f"Chosen on the dev set ({where}); no trial saw the test rows."
    if test is None:
        return text + (" No test figures: set eval.data or eval.split." if chosen else "")
    return text + f" The test figures of {chosen} below were computed once, after the choice (test.json)."


def write_sweep_report(out: Path, trials: list[dict[str, Any]], chosen: str | None, why: dict[str, str],
                       settings: dict[str, Any], before: dict[str, Any] | None,
                       test: dict[str, Any] | None = None) -> list[Path]:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.html`` into ``out``; returns their paths.
    ``test``: the chosen trial's test figures (``sft.tuning.sweep.figures_on_test``) when chosen on dev."""
    from sft.reporting.report import BA_HEADER, before_after_rows
    out.mkdir(parents=True, exist_ok=True)
    budget = settings.get("max_forgetting")
    verdict = (f"Chosen: {chosen} ({why.get(chosen, '')})" if chosen else
               "No trial qualifies: see the verdict column for why each one lost.")
    start = ""
    if before is not None:
        ppl = ((before.get("forgetting") or {}).get("reference_perplexity"))
        start = (f"Starting model: eval loss {fmt(_num(before.get('eval_loss')))}, task accuracy "
                 f"{fmt(_num(before.get('task_accuracy')))}, reference perplexity {fmt(_num(ppl))}.")
    rows = table_rows(trials, why)
    curves = {t["name"]: [(float(s), v) for s, v in t["loss_curve"]] for t in trials}
    loss_svg = svg_chart(curves, "training loss per trial", "loss")
    points = [(t["name"], t["forgetting"], t["task_accuracy"]) for t in trials
              if t["forgetting"] is not None and t["task_accuracy"] is not None]
    scatter = svg_scatter(points, budget, chosen)

    rules = (f"Objective: {settings.get('objective')} ({'lower' if settings.get('objective') == 'eval_loss' else 'higher'}"
             f" is better); forgetting budget: {fmt(budget, 'signed_pct') if budget is not None else 'none'}; "
             f"pruning: {'on' if settings.get('prune') else 'off'}.")
    sets = settings.get("selected_on_sets") or []
    if settings.get("selected_on") == "dev":
        rules += " " + dev_note(sets, chosen, test)
    else:
        rules += " " + selection_note(sets, len(trials))
    data = {"settings": settings, "selected_on": settings.get("selected_on"), "chosen": chosen, "verdicts": why,
            "before": before and {k: before.get(k) for k in ("eval_loss", "task_accuracy", "stop_rate", "forgetting")},
            "trials": trials}
    test_rows: list[list[str]] = []
    if test is not None:
        keep = ("eval_loss", "task_accuracy", "stop_rate", "refusal_rate", "over_refusal_rate", "forgetting",
                "intervals", "n", "n_examples", "split")
        data["test"] = {"trial": test.get("trial"), "comparison": test.get("comparison"),
                        **{side: {k: (test.get(side) or {}).get(k) for k in keep} for side in ("before", "after")}}
        test_rows = before_after_rows(test.get("before"), test.get("after"), test.get("comparison"))
    paths = [out / "sweep.json", out / "sweep.md", out / "sweep.html"]
    atomic_write_text(paths[0], json.dumps(data, indent=1, default=str))
    md = ["# sft sweep", "", verdict, "", rules, ""] + ([start, ""] if start else []) + [
        md_table(rows, HEADER), "", "Forgetting is the relative rise of reference perplexity vs the starting model.",
        "Loss curves and the accuracy/forgetting plot are in sweep.html.", ""]
    by_setting = settings.get("by_setting") or []
    objective = str(settings.get("objective"))
    seed_rows = [[s["name"], str(s["seeds"]), f"{fmt(s.get(objective))} ± {fmt(s.get(objective + '_sd'))}",
                  f"{fmt(s.get('forgetting'), 'signed_pct')} ± {fmt(s.get('forgetting_sd'), 'signed_pct')}"]
                 for s in by_setting]
    seed_header = ["setting", "seeds", f"{objective} mean ± sd", "forgetting mean ± sd"]
    if seed_rows:
        md += [f"## Settings over {settings.get('seeds')} seeds (chosen on the mean)", "", md_table(seed_rows, seed_header), ""]
    if test_rows:
        md += [f"## Test figures of {chosen} (computed once, after the choice on dev)", "",
               md_table(test_rows, BA_HEADER), ""]
    atomic_write_text(paths[1], "\n".join(md))
    esc = html.escape
    body = ["<h1>sft sweep</h1>", f"<p><b>{esc(verdict)}</b></p>", f"<p>{esc(rules)}</p>"]
    if start:
        body.append(f"<p>{esc(start)}</p>")
    body += [html_table(rows, HEADER), f'<div class="plots">{loss_svg}{scatter}</div>',
             "<p>Forgetting is the relative rise of reference perplexity vs the starting model.</p>"]
    if seed_rows:
        body += [f"<h2>Settings over {settings.get('seeds')} seeds (chosen on the mean)</h2>",
                 html_table(seed_rows, seed_header)]
    if test_rows:
        body += [f"<h2>Test figures of {esc(chosen or '')} (computed once, after the choice on dev)</h2>",
                 html_table(test_rows, BA_HEADER)]
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>sft sweep</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    atomic_write_text(paths[2], page)
    return paths
