"""Intervals and paired tests against textbook values, and the bootstrap's coverage."""

from __future__ import annotations

import random

import pytest

from sft.evaluation.stats import bootstrap_mean, mcnemar, paired_bootstrap, verdict, wilson


@pytest.mark.parametrize(("k", "n", "want"), [
    (8, 10, (0.4902, 0.9433)),  # = R's prop.test(8, 10, correct=FALSE)$conf.int
    (0, 8, (0.0, 0.3244)),
    (2, 8, (0.0715, 0.5907)),  # the demo's old over-refusal: 2 of 8 runs from ~7% to ~59%
    (75, 100, (0.657, 0.8245)),
])
def test_wilson_textbook(k, n, want):
    lo, hi = wilson(k, n)
    assert (round(lo, 4), round(hi, 4)) == want


def test_wilson_control_is_not_the_normal_interval():
    # the Wald interval for 8/10 is 0.8 +- 0.2479 = (0.552, 1.048): a wrong formula fails above
    lo, hi = wilson(8, 10)
    assert abs(lo - 0.552) > 0.05 and hi < 1.0


def test_mcnemar_known_table():
    # 2x2 table: both right 30, only A right 9, only B right 2, both wrong 59.
    # Exact McNemar = binom.test(2, 11, 0.5) in R: p = 0.06543 (67 / 2048 doubled).
    a = [True] * 30 + [True] * 9 + [False] * 2 + [False] * 59
    b = [True] * 30 + [False] * 9 + [True] * 2 + [False] * 59
    only_a, only_b, p = mcnemar(a, b)
    assert (only_a, only_b) == (9, 2)
    assert p == pytest.approx(0.0654297, abs=1e-6)
    # one more discordant row the same way crosses 5%: binom.test(2, 12) p = 0.03857
    assert mcnemar([*a, True], [*b, False])[2] == pytest.approx(0.0385742, abs=1e-6)
    # control: concordant rows carry no information
    assert mcnemar(a + [True] * 50, b + [True] * 50)[2] == p


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError, match="pair the same rows"):
        mcnemar([True], [True, False])


def test_bootstrap_coverage_on_known_mean():
    """Exponential(1) samples of 40: the 95% interval should hold the true mean 1.0 in ~95% of
    repetitions (percentile bootstrap undercovers a little for skewed data: accept 88-99%)."""
    rng = random.Random(7)
    reps, hits = 200, 0
    for r in range(reps):
        xs = [rng.expovariate(1.0) for _ in range(40)]
        lo, hi = bootstrap_mean(xs, samples=400, seed=r)
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / reps <= 0.99, hits / reps
    # control: a 50% interval must cover far less often, so the test above can fail
    hits50 = 0
    for r in range(reps):
        xs = [rng.expovariate(1.0) for _ in range(40)]
        lo, hi = bootstrap_mean(xs, samples=400, seed=r, alpha=0.5)
        hits50 += lo <= 1.0 <= hi
    assert hits50 / reps < 0.7


def test_paired_bootstrap_detects_shift_and_not_noise():
    rng = random.Random(3)
    a = [rng.gauss(2.0, 0.5) for _ in range(60)]
    shifted = [x - 0.3 + rng.gauss(0, 0.05) for x in a]
    diff, ci, p = paired_bootstrap(a, shifted)
    assert ci is not None and ci[1] < 0 and p < 0.01 and -0.35 < diff < -0.25
    noise = [x + rng.gauss(0, 0.05) for x in a]
    diff, ci, p = paired_bootstrap(a, noise)
    assert ci is not None and ci[0] < 0 < ci[1] and p > 0.05


def test_verdict_words():
    assert verdict(-0.1, 0.01, False) == "better"
    assert verdict(0.05, 0.2, True) == "no detectable difference at 95%"
