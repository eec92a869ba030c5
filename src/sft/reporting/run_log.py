"""What a run shows and records: metrics.jsonl, the progress bar / log line, TensorBoard, the report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from sft.config import Config, to_dict


def write_report(out: Path, cfg: Config, data_report: dict[str, Any], before: Any, after: Any) -> None:
    from sft.reporting.report import print_before_after, write_report

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    html, md = write_report(out, to_dict(cfg), metrics, before, after, data_report)
    if before is not None and after is not None:
        print_before_after(before, after)
    print(f"Report: {html} and {md}", flush=True)


def append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after the resumed step (a killed run may have logged steps it never saved)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def elapsed_at(path: Path) -> float:
    if not path.exists():
        return 0.0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    return float(times[-1]) if times else 0.0


def tensorboard_writer(cfg: Config, out: Path) -> Any:
    if not cfg.train.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: train.tensorboard is on but tensorboard is not installed; `pip install tensorboard`",
              file=sys.stderr)
        return None
    return SummaryWriter(str(out / "tensorboard"))


def progress_bar(total: int, start: int, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def say(bar: Any, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def log_step(bar: Any, row: dict[str, Any], total: int, start: int, t0: float, enabled: bool) -> None:
    if not enabled:
        return
    done = row["step"]
    secs = time.perf_counter() - t0
    tok_s = row["tokens"] / max(1e-9, secs / max(1, done - start))
    eta = secs / max(1, done - start) * (total - done)
    text = (f"step {done}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.1e} | {tok_s:.0f} tok/s | "
            f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
    if bar is not None:
        bar.set_postfix_str(text.split(" | ", 1)[1], refresh=False)
        bar.update(1)
    else:
        print(text, flush=True)
