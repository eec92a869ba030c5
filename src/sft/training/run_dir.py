"""The output directory's rules (a finished run is never silently overwritten, nor lost to a
failed ``--overwrite``) and clean stops on Ctrl-C / SIGTERM."""

from __future__ import annotations

import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.atomic import check_writable
from sft.errors import SftError

RUN_FILES = ("checkpoints", "final", "adapter", "metrics.jsonl", "run_state.json", "report.html", "report.md",
             "report.json", "before.json", "after.json", "config.yaml", "tensorboard")
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


@dataclass
class PreviousRun:
    """The run an ``--overwrite`` replaces, kept in ``out/.previous-run`` (a rename: instant, no
    copy) until the new run has saved a checkpoint or ``final/``. ``settle`` then deletes it; if
    the new run fails before that, ``settle`` puts it back, so a bad config never costs a run."""

    out: Path
    aside: Path | None  # None: there was no previous run

    def settle(self) -> None:
        """Call when the new run ends, however it ends (``finally``)."""
        if self.aside is None or not self.aside.is_dir():
            return
        if _saved_something(self.out):
            shutil.rmtree(self.aside, ignore_errors=True)
            return
        for name in RUN_FILES:  # what the failed new run wrote: config.yaml, metrics.jsonl, ...
            _remove(self.out / name)
        for p in self.aside.iterdir():
            p.rename(self.out / p.name)
        self.aside.rmdir()
        print(f"{self.out}: the new run saved nothing; the previous run is back in place", file=sys.stderr)


def set_aside_previous_run(out: Path, overwrite: bool) -> PreviousRun:
    """``--overwrite``: move the previous run's files into ``out/.previous-run``.

    If ``.previous-run`` already exists, an earlier ``--overwrite`` was killed (SIGKILL, power
    loss) before ``settle``: when that newer run saved nothing it is dropped and the kept run
    stays; when it saved a checkpoint or ``final/``, it becomes the previous run. Without
    ``overwrite`` an existing ``.previous-run`` is only handed on, for ``settle``.
    """
    aside = out / ASIDE
    if not overwrite:
        return PreviousRun(out, aside if aside.is_dir() else None)
    if aside.is_dir():
        if not _saved_something(out):
            for name in RUN_FILES:
                _remove(out / name)
            return PreviousRun(out, aside)
        shutil.rmtree(aside)
    moved = [out / n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
    if not moved:
        return PreviousRun(out, None)
    aside.mkdir()
    for p in moved:
        p.rename(aside / p.name)
    return PreviousRun(out, aside)


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
