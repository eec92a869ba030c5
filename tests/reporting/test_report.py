"""report.html is one self-contained file with inline SVG; report.md has the tables."""

from __future__ import annotations

import re

from sft.reporting.report import before_after_rows, print_before_after, svg_chart, write_report

BEFORE = {"task_accuracy": 0.05, "stop_rate": 0.0, "mean_response_tokens": 32.0, "eval_loss": 3.2,
          "perplexity": 24.5, "forgetting": {"reference_perplexity": 20.0},
          "samples": [{"prompt": "What is 2 + 3?", "reference": "2 + 3 = 5.", "reply": "What is 3 + 4? What",
                       "correct": False, "stopped": False}]}
AFTER = {"task_accuracy": 0.8, "stop_rate": 1.0, "mean_response_tokens": 7.5, "eval_loss": 0.4,
         "perplexity": 1.5, "forgetting": {"reference_perplexity": 23.0, "kl_to_base": 0.12},
         "samples": [{"prompt": "What is 2 + 3?", "reference": "2 + 3 = 5.", "reply": "2 + 3 = 5.",
                      "correct": True, "stopped": True}]}
METRICS = [{"step": s, "loss": 3.0 / s, "lr": 1e-4 * s / 10, "grad_norm": 1.0, "tokens": 100 * s,
            "trained_tokens": 30 * s, "elapsed_s": s * 0.5} for s in range(1, 11)]
METRICS += [{"step": 5, "eval_loss": 1.1}, {"step": 10, "eval_loss": 0.4}]


def test_write_report_self_contained(tmp_path):
    cfg = {"model": "gemma-3-270m", "output_dir": "runs/demo", "train": {"lr": 1e-4}}
    html_path, md_path = write_report(tmp_path, cfg, METRICS, BEFORE, AFTER, {"rows": 800, "tokens": 12345})
    assert html_path == tmp_path / "report.html" and md_path == tmp_path / "report.md"
    page = html_path.read_text(encoding="utf-8")
    assert page.count("<svg") >= 2 and "<polyline" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "80.0%" in page and "+75.0 pts" in page  # accuracy after, and the change
    assert "2 + 3 = 5." in page and "[no stop]" in page  # samples side by side
    md = md_path.read_text(encoding="utf-8")
    assert "| task accuracy | 5.0% | 80.0% | +75.0 pts | - | - |" in md
    assert "| stop rate | 0.0% | 100.0% | +100.0 pts | - | - |" in md
    assert "lr: 0.0001" in md


def test_report_without_eval_or_metrics(tmp_path):
    html_path, md_path = write_report(tmp_path, {"model": "m"}, [], None, None, None)
    assert "no data" in html_path.read_text() and md_path.exists()


def test_before_after_rows_and_print(capsys):
    rows = before_after_rows(BEFORE, AFTER)
    assert rows[0] == ["task accuracy", "5.0%", "80.0%", "+75.0 pts", "-", "-"]
    assert ["KL to base, nats/token (forgetting)", "-", "0.1200", "-", "-", "-"] in rows
    print_before_after(BEFORE, AFTER)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["metric", "before", "[95%", "CI]", "after", "[95%", "CI]", "change", "[95%", "CI]",
                              "p", "verdict"]
    assert any(line.startswith("task accuracy") and "+75.0 pts" in line for line in out)


def test_before_after_rows_with_intervals_and_paired_test(tmp_path):
    before = {**BEFORE, "intervals": {"task_accuracy": [0.0215, 0.1118]}}
    after = {**AFTER, "intervals": {"task_accuracy": [0.7112, 0.8666]}}
    comparison = [{"metric": "task_accuracy", "diff": 0.75, "diff_interval": [0.66, 0.83], "p": 1e-9,
                   "verdict": "better"}]
    rows = before_after_rows(before, after, comparison)
    assert rows[0] == ["task accuracy", "5.0% [2.1, 11.2]%", "80.0% [71.1, 86.7]%", "+75.0 pts [+66.0, +83.0] pts",
                       "<0.001", "better"]
    _, md = write_report(tmp_path, {"model": "m"}, METRICS, before, after, None, comparison)
    assert "| task accuracy | 5.0% [2.1, 11.2]% | 80.0% [71.1, 86.7]% | +75.0 pts [+66.0, +83.0] pts | <0.001 | better |" \
        in md.read_text()


def test_svg_chart_skips_nan_and_handles_one_point():
    svg = svg_chart({"a": [(1, float("nan")), (2, 1.0)]}, "t")
    assert "<circle" in svg and "nan" not in svg
