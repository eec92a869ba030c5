"""The output directory's rules (a finished run is never silently overwritten) and clean stops
on Ctrl-C / SIGTERM."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from sft.errors import SftError

RUN_FILES = ("checkpoints", "final", "adapter", "metrics.jsonl", "run_state.json", "report.html", "report.md",
             "report.json", "before.json", "after.json", "config.yaml", "tensorboard")


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a previous run unless ``--resume`` or ``--overwrite`` says what to do."""
    if overwrite or resume:
        return
    finished = (out / "final").exists() or (out / "run_state.json").exists()
    if finished or (out / "checkpoints").is_dir():
        raise SftError(
            f"{out}: output_dir already holds a run; continue it with --resume, "
            "start again with --overwrite, or set another output_dir"
        )


def clear_previous_run(out: Path) -> None:
    """``--overwrite``: remove what a previous run wrote (called once the new run is ready to start)."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class Interrupt:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print("\nInterrupt received: finishing this step and saving a checkpoint ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
