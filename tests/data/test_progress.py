"""Progress lines of the data stages (sft.data.progress)."""

from __future__ import annotations

import io
import re

from sft.data.progress import Progress


def test_progress_prints_rate_and_eta_then_done():
    out = io.StringIO()
    p = Progress("tokenize a.jsonl", 100, stream=out, after=0.0, every=0.0)
    p.update(25)
    p.update(25)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"tokenize a\.jsonl \| 25/100 rows \| \d+ rows/s \| eta \d+m\d\ds", lines[0])
    assert re.fullmatch(r"tokenize a\.jsonl \| 50/100 rows \| \d+ rows/s \| eta \d+m\d\ds \| done in 0m00s", lines[2])


def test_progress_is_silent_for_quick_stages_and_without_a_total_has_no_eta():
    quiet = io.StringIO()
    p = Progress("read a.jsonl", None, stream=quiet)  # default: silent for the first 2 s
    p.update(10)
    p.close()
    assert quiet.getvalue() == ""
    out = io.StringIO()
    p = Progress("read a.jsonl", None, stream=out, after=0.0, every=0.0)
    p.update(10)
    assert re.fullmatch(r"read a\.jsonl \| 10 rows \| \d+ rows/s\n", out.getvalue())
