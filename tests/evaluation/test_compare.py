"""`sft compare` and the intervals of an eval result, on synthetic eval JSONs (no model)."""

from __future__ import annotations

import json
import math
import random

import pytest

from sft.cli import main
from sft.evaluation.compare import compare_two
from sft.evaluation.intervals import add_intervals, bits


def result(correct: list[bool], nll: list[float], seed: int = 0, window_shift: float = 0.0) -> dict:
    """A minimal eval result with per-row outcomes, per-example losses and reference windows."""
    n = len(correct)
    rng = random.Random(seed)
    toks = [10 + i % 7 for i in range(len(nll))]
    w_tok = [127] * 40
    w_nll = [127 * (3.0 + window_shift) + rng.gauss(0, 5) for _ in w_tok]
    cats = "".join("h" if i % 4 == 0 else "b" if i % 4 == 1 else "-" for i in range(n))
    refused = [c == "h" and ok for c, ok in zip(cats, correct)]
    r = {
        "task_accuracy": sum(correct) / n,
        "stop_rate": 1.0,
        "refusal_rate": sum(refused[i] for i in range(n) if cats[i] == "h") / cats.count("h"),
        "over_refusal_rate": 0.0,
        "eval_loss": sum(v * t for v, t in zip(nll, toks)) / sum(toks),
        "mean_response_tokens": 5.0,
        "accuracy_by_source": {"eval.jsonl": sum(correct) / n},
        "forgetting": {"reference_perplexity": math.exp(sum(w_nll) / sum(w_tok)), "reference_sha256": "x",
                       "window_nll": w_nll, "window_tokens": w_tok},
        "rows": {"key": [f"eval.jsonl:{i + 1}" for i in range(n)], "correct": bits(correct), "stopped": "1" * n,
                 "category": cats, "refused": bits([f if c != "-" else None for f, c in zip(refused, cats)]),
                 "tokens": [5] * n},
        "losses": {"key": [f"eval.jsonl:{i + 1}" for i in range(len(nll))], "nll": [v * t for v, t in zip(nll, toks)],
                   "tokens": toks},
    }
    return dict(add_intervals(r))  # type: ignore[arg-type]


def by_metric(rows):
    return {r["metric"]: r for r in rows}


def test_intervals_shape_and_values():
    r = result([True] * 75 + [False] * 25, [2.0] * 100)
    assert r["intervals"]["task_accuracy"] == pytest.approx([0.656955, 0.824548], abs=1e-6)  # Wilson 75/100
    assert r["n"]["task_accuracy"] == 100 and r["n"]["refusal_rate"] == 25 and r["n"]["over_refusal_rate"] == 25
    assert r["intervals"]["accuracy_by_source"]["eval.jsonl"] == r["intervals"]["task_accuracy"]
    lo, hi = r["intervals"]["forgetting"]["reference_perplexity"]
    assert lo < r["forgetting"]["reference_perplexity"] < hi
    assert r["intervals"]["eval_loss"] == pytest.approx([2.0, 2.0])  # every example has the same loss


def test_clear_gain_is_better_and_noise_is_not_detectable():
    rng = random.Random(1)
    base = [rng.random() < 0.3 for _ in range(100)]
    nll = [rng.gauss(2.0, 0.3) for _ in range(100)]
    a = result(base, nll)
    b = result([True] * 70 + base[70:], [v - 0.4 for v in nll], seed=1, window_shift=0.5)
    c = compare_two(a, b)
    m = by_metric(c)
    assert m["task_accuracy"]["verdict"] == "better" and m["task_accuracy"]["p"] < 0.001
    assert m["task_accuracy"]["test"].startswith("exact McNemar")
    assert m["eval_loss"]["verdict"] == "better" and m["eval_loss"]["diff"] == pytest.approx(-0.4, abs=0.02)
    assert m["forgetting.reference_perplexity"]["verdict"] == "worse"
    lo, hi = m["task_accuracy"]["diff_interval"]
    assert 0 < lo < m["task_accuracy"]["diff"] < hi

    # control: two results that differ by two rows out of 100 and by noise in the losses
    flipped = list(base)
    flipped[0], flipped[1] = not flipped[0], not flipped[1]
    e = [rng.gauss(0, 0.05) for _ in range(49)]
    noise = e + [-x for x in e] + [0.0, 0.0]  # rows i and i + 49 have the same token count: mean shift 0
    d = by_metric(compare_two(a, result(flipped, [v + x for v, x in zip(nll, noise)], seed=2)))
    for key in ("task_accuracy", "eval_loss", "forgetting.reference_perplexity"):
        assert d[key]["verdict"] == "no detectable difference at 95%", key


def test_pairs_by_row_key_not_position():
    a = result([True, False] * 20, [2.0] * 40)
    b = json.loads(json.dumps(a))
    for k in ("key",):
        b["rows"][k] = list(reversed(b["rows"][k]))
    for k in ("correct", "stopped", "category", "refused"):
        b["rows"][k] = b["rows"][k][::-1]
    m = by_metric(compare_two(a, b))
    assert m["task_accuracy"]["test"] == "exact McNemar (0 rows only A, 0 only B)" and m["task_accuracy"]["p"] == 1.0
    # control: the same outcomes NOT re-keyed disagree on every row
    b["rows"]["key"] = a["rows"]["key"]
    m = by_metric(compare_two(a, b))
    assert m["task_accuracy"]["test"] == "exact McNemar (20 rows only A, 20 only B)"


def test_old_results_without_rows_say_not_paired():
    a = {"task_accuracy": 0.5, "eval_loss": 2.0}
    m = by_metric(compare_two(a, dict(a)))
    assert m["task_accuracy"]["verdict"].startswith("not paired") and m["task_accuracy"]["p"] is None


def test_cli_compare_run_dir_and_json(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rng = random.Random(4)
    base = [rng.random() < 0.5 for _ in range(60)]
    (run / "before.json").write_text(json.dumps(result(base, [2.0] * 60)))
    (run / "after.json").write_text(json.dumps(result([*base[:58], not base[58], not base[59]], [2.0] * 60)))
    assert main(["compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "task accuracy" in out and "no detectable difference at 95%" in out and "[95% CI]" in out
    assert main(["compare", str(run / "before.json"), str(run / "after.json"), str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["comparisons"]) == 2
    assert main(["compare", str(run / "nope.json"), str(run)]) == 1
    assert "no such file" in capsys.readouterr().err
    (run / "bad.json").write_text("{}")
    assert main(["compare", str(run / "bad.json"), str(run)]) == 1
    assert "not an eval result" in capsys.readouterr().err


def test_diff_is_over_the_rows_in_common_as_its_interval_and_verdict(tmp_path, capsys):
    """B evaluated 20 more rows than A (a larger eval.max_examples), all of them correct; on the 20
    rows both evaluated the two agree. B - A must be the paired difference (0), the one its interval,
    p and verdict are about, not B's 40-row rate minus A's 20-row rate (+25 pts outside [0, 0]).
    The printed table says the difference is over the rows in common."""
    first = [True, False] * 10
    a = result(first, [2.0] * 20)
    b = result(first + [True] * 20, [2.0] * 20 + [1.0] * 20)
    m = by_metric(compare_two(a, b))
    for key in ("task_accuracy", "eval_loss"):
        assert m[key]["b"] - m[key]["a"] != 0  # control: the unpaired difference
        lo, hi = m[key]["diff_interval"]
        assert m[key]["diff"] == pytest.approx(0.0) and lo <= m[key]["diff"] <= hi
        assert m[key]["n"] == 20
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "+25.0 pts" not in out and "20 rows in common" in out


def test_reference_windows_that_differ_say_why():
    """Same reference text, another eval.reference_tokens (fewer windows): the verdict names the
    budget (it said "another reference text or tokenizer", which was not the case)."""
    a = result([True, False] * 10, [2.0] * 20)
    b = json.loads(json.dumps(a))
    b["forgetting"]["window_nll"] = b["forgetting"]["window_nll"][:10]
    b["forgetting"]["window_tokens"] = b["forgetting"]["window_tokens"][:10]
    m = by_metric(compare_two(a, b))
    assert m["forgetting.reference_perplexity"]["verdict"] == (
        "not paired: other reference windows (40 against 10: another eval.reference_tokens or tokenizer)")
    b["forgetting"]["reference_sha256"] = "y"  # control: another text
    assert by_metric(compare_two(a, b))["forgetting.reference_perplexity"]["verdict"] == (
        "not paired: another reference text")
