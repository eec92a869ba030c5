"""The output directory's rules (a finished run is never silently overwritten, nor lost to a
failed ``--overwrite``) and clean stops on Ctrl-C / SIGTERM."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from sft.atomic import check_writable
from sft.errors import SftError

RUN_FILES = ("checkpoints", "final", "adapter", "export", "metrics.jsonl", "run_state.json", "report.html", "report.md",
             "report.json", "before.json", "after.json", "config.yaml", "tensorboard",
             "data_report.json")
ASIDE = ".previous-run"  # where --overwrite keeps the previous run until the new one has saved something


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a previous run unless ``--resume`` or ``--overwrite`` says what to do,
    and fail before the data loads when ``out`` cannot be created or written (e.g. under /proc)."""
    check_writable(out, "output_dir")
    if overwrite or resume:
        return
    finished = (out / "final").exists() or (out / "run_state.json").exists()
    if finished or (out / "checkpoints").is_dir() or (out / ASIDE).is_dir():
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


def _saved_something(out: Path) -> bool:
    """Whether the run in ``out`` has a result worth more than an older run: final/ or a checkpoint."""
    from sft.training.checkpoint import list_checkpoints

    return (out / "final").is_dir() or bool(list_checkpoints(out / "checkpoints"))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


class PreviousRun:
    """``--overwrite`` without losing the old run: ``set_aside`` (called once the new run's data is
    valid and its model loaded) moves the previous run's files into ``out/.previous-run`` (renames:
    instant, no copy); leaving the ``with`` block, ``settle`` deletes them if the new run saved a
    checkpoint or ``final/``, and otherwise puts them back, so a failed retry never costs a run.

    A ``.previous-run`` left by a killed process is picked up on entry: settled the same way.
    ``active=False`` (the non-writing ranks of a distributed run) makes every step a no-op.

    >>> import tempfile; out = Path(tempfile.mkdtemp())
    >>> (out / "final").mkdir(); (out / "report.md").write_text("old") and None
    >>> with PreviousRun(out, overwrite=True) as previous:
    ...     previous.set_aside(); _ = (out / "metrics.jsonl").write_text("the new run failed here")
    >>> sorted(p.name for p in out.iterdir()), (out / "report.md").read_text()
    (['final', 'report.md'], 'old')
    """

    def __init__(self, out: Path, overwrite: bool, active: bool = True) -> None:
        self.out, self.overwrite, self.active = out, overwrite, active
        self.aside: Path | None = None

    def __enter__(self) -> PreviousRun:
        if self.active and (self.out / ASIDE).is_dir():
            self.aside = self.out / ASIDE
        return self

    def __exit__(self, *exc: Any) -> None:
        self.settle()

    def set_aside(self) -> None:
        """Move the previous run's files into ``.previous-run`` (only with ``--overwrite``)."""
        if not (self.active and self.overwrite):
            return
        aside = self.out / ASIDE
        if aside.is_dir():  # left by a killed --overwrite
            if not _saved_something(self.out):
                for name in RUN_FILES:  # that run saved nothing: drop it, keep the older one
                    _remove(self.out / name)
                self.aside = aside
                return
            shutil.rmtree(aside)  # it saved something: it is the previous run now
        moved = [self.out / n for n in RUN_FILES if (self.out / n).exists() or (self.out / n).is_symlink()]
        if not moved:
            return
        aside.mkdir()
        for p in moved:
            p.rename(aside / p.name)
        self.aside = aside

    def settle(self) -> None:
        """Drop the previous run if this one saved something, else put it back."""
        if self.aside is None or not self.aside.is_dir():
            return
        if _saved_something(self.out):
            shutil.rmtree(self.aside, ignore_errors=True)
        else:
            for name in RUN_FILES:  # what the failed new run wrote: config.yaml, metrics.jsonl, ...
                _remove(self.out / name)
            for p in self.aside.iterdir():
                p.rename(self.out / p.name)
            self.aside.rmdir()
            print(f"{self.out}: the new run saved nothing; the previous run is back in place", file=sys.stderr)
        self.aside = None


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
