"""Writing files so that a crash, a full disk or Ctrl-C never leaves half a file behind.

Every output sft writes whole (reports, ``before.json``/``after.json``, ``--out`` files, the
rewritten ``metrics.jsonl``) goes to a temporary file in the same folder and is renamed over the
target only once it is complete: readers see the old file or the new one, never a mixture.
Folders (``final/``, ``adapter/``, checkpoints) are written the same way by ``atomic_write_dir``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from sft.errors import SftError


@contextmanager
def atomic_open(path: Path | str, fsync: bool = True) -> Iterator[TextIO]:
    """A text file that appears at ``path`` only when the ``with`` block ends without an error.

    >>> import tempfile; d = Path(tempfile.mkdtemp()); p = d / "a.txt"
    >>> with atomic_open(p) as f: _ = f.write("one")
    >>> try:
    ...     with atomic_open(p) as f: _ = f.write("two, half"); raise OSError(28, "No space left on device")
    ... except OSError: pass
    >>> p.read_text(), sorted(x.name for x in d.iterdir())
    ('one', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666 (not mkstemp's 0o600): the file gets the permissions the umask gives
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_open(path) as f:
        f.write(text)


def check_writable(path: Path | str, what: str) -> None:
    """Fail now, before any slow work, when folder ``path`` cannot be created or written.

    ``what`` names the setting in the message (e.g. ``output_dir`` or ``--out``). Nothing is
    left behind: the nearest existing folder gets a probe folder that is removed at once.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise SftError(f"{path}: {what} cannot be created because {existing} is a file, not a folder; "
                       "choose another path")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".sft-probe-").cleanup()
    except OSError as e:
        raise SftError(f"{path}: {what} cannot be written ({e.strerror} in {existing}); "
                       "choose a folder you can write, e.g. under your home or the project") from None


def check_out_file(path: Path | str, what: str, example: str) -> None:
    """``check_writable`` for a file to be written: fail now, too, when ``path`` is a folder
    (``example`` is a file name to suggest inside it)."""
    path = Path(path)
    if path.is_dir():
        raise SftError(f"{path}: {what} is a folder; give a file name, e.g. {path / example}")
    check_writable(path.parent, what)


# ---------------------------------------------------------------------------------------------
# folders


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk (before the rename that publishes the folder)."""
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def rename_into_place(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` to ``target``; an old ``target`` is moved aside first and
    deleted after the swap (``recover_swap`` undoes a kill between the two renames)."""
    old = None
    if target.exists():  # replace: move the old one aside first, delete after the swap
        old = target.parent / f".old-{target.name}"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_swap(target: Path) -> None:
    """A process killed between the two renames of a replace leaves ``.old-NAME`` and no ``NAME``:
    put the old one back, so ``target`` is always either the old or the new complete folder."""
    old = target.parent / f".old-{target.name}"
    if old.is_dir() and not target.exists():
        old.rename(target)


def atomic_write_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` into a sibling temporary folder, then rename it to ``target``. A failure while
    writing (a full disk) removes the partial folder and leaves the previous ``target`` as it was."""
    recover_swap(target)
    tmp = target.parent / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rename_into_place(tmp, target)
