"""What ``sft ui`` reads from a runs directory: which folders are runs, each run's status and
headline numbers, its metrics (tolerant of a file being written or cut short), and config
differences between runs. Plain functions over files: no server, no torch.

A run directory is what ``sft train`` writes (sft.training.run_dir.RUN_FILES): ``config.yaml``,
``metrics.jsonl``, ``run_state.json`` once finished, ``before.json`` / ``after.json``,
``data_report.json``, ``checkpoints/step-N``; a sweep trial adds ``trial.json``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import yaml

LIVE_SECONDS = 120.0  # a run whose files changed this recently counts as running (at least)
FIRST_STEP_SECONDS = 600.0  # before its first step (model load, compile, a slow first step): this long
SKIP_DIRS = {"checkpoints", "final", "adapter", "export", "tensorboard", "wandb", "mlruns", "trackio", ".previous-run"}
HEADLINE = ("eval_loss", "task_accuracy", "stop_rate", "refusal_rate", "over_refusal_rate")


class NotARun(Exception):
    """A path outside the runs directory, or a folder that holds no run."""


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing, half-written or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int, list[str]]:
    """The rows of ``metrics.jsonl`` from byte ``offset``: (rows, offset to read from next time,
    problems). Only whole lines are read, so a line being written is picked up on the next call;
    a whole line that is not a JSON object is skipped and named in ``problems``.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> _ = p.write_bytes(b'{"step": 1, "loss": 2.5}\\nnot json\\n{"step": 2, "lo')
    >>> read_metrics(p)
    ([{'step': 1, 'loss': 2.5}], 34, ['line 2: not a JSON object'])
    """
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset, []
    end = data.rfind(b"\n") + 1  # a torn last line waits for its newline
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for line_no, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            problems.append(f"line {line_no}: not a JSON object" if offset == 0 else "a line that is not a JSON object")
    return rows, offset + end, problems


def is_run(d: Path) -> bool:
    return (d / "config.yaml").is_file() or (d / "metrics.jsonl").is_file()


def find_runs(root: Path, depth: int = 4) -> list[Path]:
    """Run folders under ``root`` (``root`` itself included), sweep trials too, sorted by path."""
    found: list[Path] = []

    def walk(d: Path, left: int) -> None:
        if is_run(d):
            found.append(d)
        if left == 0:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink() and p.name not in SKIP_DIRS)
        except OSError:
            return
        for c in children:
            walk(c, left - 1)

    walk(root, depth)
    return found


def run_id(root: Path, run: Path) -> str:
    """The run's path relative to the runs directory, as the UI names it ("." for the root itself)."""
    return run.relative_to(root).as_posix() or "."


def resolve_run(root: Path, rid: str) -> Path:
    """The run folder named ``rid`` under ``root``; NotARun when it escapes ``root`` (``..``, an
    absolute path, a symlink out) or holds no run."""
    if "\x00" in rid or rid.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rid):
        raise NotARun(rid)
    base = root.resolve()
    p = (base / rid).resolve()
    if p != base and base not in p.parents:
        raise NotARun(rid)
    if not p.is_dir() or not is_run(p):
        raise NotARun(rid)
    return p


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints (``checkpoints/step-N``)."""
    d = run / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)))


def live_window(rows: list[dict[str, Any]]) -> float:
    """How long a run may go without writing and still count as running: 3 x its slowest step so
    far (at least LIVE_SECONDS), or FIRST_STEP_SECONDS before its first step is logged.

    >>> live_window([]), live_window([{"step": 1, "elapsed_s": 20.0}, {"step": 2, "elapsed_s": 150.0}])
    (600.0, 390.0)
    """
    times = [0.0] + [float(r["elapsed_s"]) for r in rows if _num(r.get("elapsed_s")) is not None]
    if len(times) == 1:
        return FIRST_STEP_SECONDS
    return max(LIVE_SECONDS, 3 * max(b - a for a, b in itertools.pairwise(times)))


def status(run: Path, rows: list[dict[str, Any]], now: float | None = None) -> str:
    """finished (run_state.json), running (files changed within ``live_window``), interrupted
    (stopped with a checkpoint at its last step: Ctrl-C, SIGTERM, a pruned sweep trial) or failed."""
    state = read_json(run / "run_state.json")
    if isinstance(state, dict) and state.get("status") == "finished":
        return "finished"
    now = time.time() if now is None else now
    times = [p.stat().st_mtime for p in (run / "metrics.jsonl", run / "config.yaml", run / "before.json") if p.exists()]
    if times and now - max(times) < live_window(rows):
        return "running"
    last = max((int(r["step"]) for r in rows if "loss" in r), default=0)
    trial = read_json(run / "trial.json")
    trial_status = trial.get("status") if isinstance(trial, dict) else None
    if trial_status == "failed":
        return "failed"
    if (last and last in checkpoint_steps(run)) or trial_status in ("pruned", "interrupted"):
        return "interrupted"
    return "failed"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def tokens_per_s(rows: list[dict[str, Any]]) -> float | None:
    """Throughput over the last (up to) 10 steps, from ``tokens`` and ``elapsed_s``.

    >>> tokens_per_s([{"step": 1, "tokens": 100, "elapsed_s": 1.0}, {"step": 2, "tokens": 100, "elapsed_s": 1.5}])
    200.0
    """
    steps = [r for r in rows if "tokens" in r and _num(r.get("elapsed_s")) is not None][-11:]
    if len(steps) < 2:
        return None
    dt = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    return round(sum(r["tokens"] for r in steps[1:]) / dt, 1) if dt > 0 else None


def load_config(run: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def data_names(config: dict[str, Any]) -> list[str]:
    train = (config.get("data") or {}).get("train") or []
    return [str(s.get("name") or s.get("path")) if isinstance(s, dict) else str(s) for s in train]


def summary(root: Path, run: Path, now: float | None = None) -> dict[str, Any]:
    """One row of the runs table."""
    rows, _, problems = read_metrics(run / "metrics.jsonl")
    config = load_config(run)
    state = read_json(run / "run_state.json") or {}
    before, after = read_json(run / "before.json"), read_json(run / "after.json")
    losses = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r or "dev_loss" in r]
    trial = read_json(run / "trial.json")
    return {
        "id": run_id(root, run),
        "status": status(run, rows, now),
        "model": str(config.get("model", "")),
        "data": data_names(config),
        "step": losses[-1]["step"] if losses else 0,
        "total": state.get("steps") if isinstance(state, dict) else None,
        "loss": _num(losses[-1].get("loss")) if losses else None,
        "eval_loss": _num(evals[-1].get("eval_loss", evals[-1].get("dev_loss"))) if evals else None,
        "tokens_per_s": tokens_per_s(rows),
        "before": {k: _num((before or {}).get(k)) for k in HEADLINE if isinstance(before, dict)},
        "after": {k: _num((after or {}).get(k)) for k in HEADLINE if isinstance(after, dict)},
        "sweep": sweep_of(root, run),
        "trial": trial.get("params") if isinstance(trial, dict) else None,
        "problems": problems,
    }


def sweep_of(root: Path, run: Path) -> str | None:
    """The id of the sweep a trial belongs to (its folder is ``SWEEP/trials/NAME``), else None."""
    if run.parent.name != "trials" or run == root or run.parent == root:
        return None
    return run_id(root, run.parent.parent)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """
    >>> flatten({"train": {"lr": 0.1}, "model": "m"})
    {'train.lr': 0.1, 'model': 'm'}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(configs: list[dict[str, Any]]) -> list[tuple[str, list[str], bool]]:
    """Every config key as (key, the value in each run as text, whether they differ); differing
    keys first.

    >>> config_diff([{"train": {"lr": 0.1, "seed": 1}}, {"train": {"lr": 0.2, "seed": 1}}])
    [('train.lr', ['0.1', '0.2'], True), ('train.seed', ['1', '1'], False)]
    """
    flat = [flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f} - {"output_dir"})
    rows = [(k, [json.dumps(f.get(k), default=str) if not isinstance(f.get(k), str) else str(f.get(k)) for f in flat])
            for k in keys]
    out = [(k, vals, len(set(vals)) > 1) for k, vals in rows]
    return sorted(out, key=lambda r: (not r[2], r[0]))


def interval_text(v: Any) -> str:
    """An eval interval as text, whatever its shape: [lo, hi] or {"low": .., "high": ..}.

    >>> interval_text([0.5, 0.75]), interval_text({"low": 0.5, "high": 0.75, "method": "wilson"})
    ('[0.5, 0.75]', '[0.5, 0.75] wilson')
    """
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) is not None for x in v):
        return f"[{v[0]:.4g}, {v[1]:.4g}]"
    if isinstance(v, dict):
        lo, hi = v.get("low", v.get("lo")), v.get("high", v.get("hi"))
        if _num(lo) is not None and _num(hi) is not None:
            rest = " ".join(str(x) for k, x in v.items() if k in ("method", "level"))
            return f"[{lo:.4g}, {hi:.4g}]" + (f" {rest}" if rest else "")
    return json.dumps(v, default=str)
