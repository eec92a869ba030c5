"""What a run shows and records while it trains: ``metrics.jsonl``, the progress bar or log line,
the trackers of ``train.report_to``; and the report at its end. Only the writing process (rank 0)
creates a RunLog that writes; the others get a silent one."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from sft.atomic import atomic_write_text
from sft.config import Config, to_dict
from sft.errors import SftError
from sft.reporting.trackers import Trackers


def append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a last line cut short by a kill (its step was never saved) is
    dropped, any other line that is not JSON is an SftError naming it."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if not isinstance(row, dict):
            if i == len(lines):
                break
            raise SftError(f"{path}:{i}: not a metrics row (JSON object); fix or delete the line")
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after the resumed step (a killed run may have logged steps it never saved)."""
    if path.exists():
        keep = [r for r in read_rows(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))  # never half a metrics file


def elapsed_at(path: Path) -> float:
    """Training seconds already spent by the steps in ``path`` (resume continues the clock)."""
    times = [r["elapsed_s"] for r in read_rows(path) if "elapsed_s" in r]
    return float(times[-1]) if times else 0.0


def step_line(row: dict[str, Any], total: int, secs_per_step: float) -> str:
    """The log line of one step.

    >>> step_line({"step": 3, "loss": 1.23456, "lr": 2e-5, "tokens": 512}, 10, 2.0)
    'step 3/10 | loss 1.2346 | lr 2.0e-05 | 256 tok/s | eta 0m14s'
    """
    eta = secs_per_step * (total - row["step"])
    return (f"step {row['step']}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.1e} | "
            f"{row['tokens'] / max(1e-9, secs_per_step):.0f} tok/s | eta {int(eta // 60)}m{int(eta % 60):02d}s")


class RunLog:
    """metrics.jsonl (every step), the log line (every ``train.log_every`` steps) or a progress bar
    on a terminal, and the same rows to ``trackers`` (``train.report_to``; opened by the caller)."""

    def __init__(self, cfg: Config, out: Path, total: int, start: int, show: bool, write: bool,
                 trackers: Trackers | None = None) -> None:
        self.path, self.total, self.start = out / "metrics.jsonl", total, start
        self.show, self.write, self.every = show, write, max(1, cfg.train.log_every)
        self.t0 = time.perf_counter()
        self.elapsed_before = elapsed_at(self.path) if write else 0.0
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self.trackers = trackers if write else None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def step(self, row: dict[str, Any]) -> None:
        done = row["step"]
        if self.write:
            append_row(self.path, row)
            if self.trackers is not None:
                self.trackers.log_row(row)
        if not self.show:
            return
        line = step_line(row, self.total, (time.perf_counter() - self.t0) / max(1, done - self.start))
        if self.bar is not None:
            self.bar.set_postfix_str(line.split(" | ", 1)[1], refresh=False)
            self.bar.update(1)
        elif done % self.every == 0 or done == self.total:
            print(line, flush=True)

    def eval(self, step: int, eval_loss: float, key: str = "eval_loss") -> None:
        """A held-out loss row: ``eval_loss``, or ``dev_loss`` when it is measured on the dev set."""
        if self.write:
            row = {"step": step, key: round(eval_loss, 6)}
            append_row(self.path, row)
            if self.trackers is not None:
                self.trackers.log_row(row)
        self.say(f"step {step}/{self.total} | {key} {eval_loss:.4f}")

    def say(self, text: str) -> None:
        if not self.show:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_data_report(out: Path, report: dict[str, Any], quality: dict[str, list[dict[str, Any]]]) -> None:
    """``data_report.json``: the data report (source paths made absolute, so ``sft ui`` finds the
    files from any folder) and the first 50 quality findings of each kind, for ``sft ui``."""
    sources = [{**s, "path": str(Path(s["path"]).resolve())} for s in report.get("sources", [])]
    data = {**report, "sources": sources, "quality": {k: v[:50] for k, v in quality.items()}}
    atomic_write_text(out / "data_report.json", json.dumps(data, indent=1, default=str))


def write_run_report(out: Path, cfg: Config, data_report: dict[str, Any], before: Any, after: Any,
                     comparison: list[dict[str, Any]] | None = None) -> None:
    """report.html and report.md of a finished run, and the before/after table on the terminal
    (``comparison``: the paired tests of ``sft.evaluation.compare.compare_two(before, after)``)."""
    from sft.reporting.report import print_before_after, write_report

    html, md = write_report(out, to_dict(cfg), read_rows(out / "metrics.jsonl"), before, after, data_report, comparison)
    if before is not None and after is not None:
        print_before_after(before, after, comparison)
    print(f"Report: {html} and {md}", flush=True)
