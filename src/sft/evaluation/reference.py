"""General English text to measure forgetting on: how much did fine-tuning hurt plain language?

The default is a fixed snapshot shipped with the package, ``texts/stdlib_prose_v1.txt``: about
160,000 characters (~33,000 SmolLM2 tokens) of English prose from the docstrings of the CPython
3.11.7 standard library (PSF License Version 2; see ``texts/README.md``). It was written once by
``python -m sft.evaluation.reference --write PATH`` and is never rebuilt at run time, so every
machine and Python version scores the same text; its ``REFERENCE_VERSION`` and sha256 are
recorded in each eval result (``forgetting.reference``). ``eval.reference`` may name any other
UTF-8 text file instead; the result then records ``file:<name>`` and that file's sha256.

Only paragraphs that read like sentences are kept: no code, no doctest lines, no tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sft.errors import SftError

REFERENCE_FILE = "stdlib_prose_v1.txt"
REFERENCE_VERSION = "stdlib-prose-v1"  # change both names together when the snapshot changes
REFERENCE_SHA256 = "8c1b54deaf5ea5ce73efb2dca98855e64e053dd7cacadc0e73a0293cea1c2a0f"  # of the file

# Standard-library modules with long, plain-English documentation, first, in a fixed order; the
# snapshot then adds every other importable module in sorted order.
MODULES = (
    "turtle", "json", "argparse", "socket", "unittest", "pydoc", "inspect", "heapq", "sched",
    "subprocess", "doctest", "random", "tempfile", "difflib", "string", "pickle", "threading",
    "logging", "shutil", "collections", "functools", "itertools", "asyncio", "csv", "zipfile",
)
# never imported while writing the snapshot: side effects (a browser, a window) or not prose
SKIP = frozenset({
    "antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "__main__", "pydoc_data",
    "lib2to3", "ensurepip", "venv", "test", "msilib", "winreg", "winsound", "nt", "msvcrt", "curses",
    "readline",
})


@dataclass(frozen=True)
class Reference:
    text: str
    version: str  # REFERENCE_VERSION, or "file:<name>" for eval.reference
    sha256: str  # of the UTF-8 bytes


def is_prose(paragraph: str) -> bool:
    """A paragraph that reads like English sentences (no code, doctest, table or list of names).

    >>> is_prose("The module provides a simple way to read and write files in the CSV format.")
    True
    >>> is_prose(">>> x = f(1, 2)  # returns a tuple of (value, error)")
    False
    """
    text = " ".join(paragraph.split())
    if len(text) < 60 or not text.endswith(".") or not text[0].isupper() or text.isupper():
        return False
    if any(marker in text for marker in (">>>", "::", "==", "->", "()", "__", "{", "[", "|", "\\")):
        return False
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / len(text) > 0.9 and len(text.split()) >= 10


def prose_paragraphs(doc: str) -> list[str]:
    """The prose paragraphs of a docstring, each joined onto one line.

    >>> prose_paragraphs("Title\\n\\nThis function returns the number of items that are\\nstill waiting in the queue for a worker.\\n\\n  >>> f()\\n  3")
    ['This function returns the number of items that are still waiting in the queue for a worker.']
    """
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        if any(line.startswith((" ", "\t", "-", "*")) for line in lines):  # code, lists, options
            continue
        if is_prose(para):
            out.append(" ".join(para.split()))
    return out


def stdlib_prose() -> str:
    """Prose paragraphs of every importable standard-library module's docstrings (MODULES first,
    then the rest sorted), each paragraph once. Used only to write the snapshot."""
    names = [m for m in MODULES if m not in SKIP]
    names += [m for m in sorted(sys.stdlib_module_names) if not m.startswith("_") and m not in SKIP and m not in names]
    seen: set[str] = set()
    picked: list[str] = []
    for name in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod = importlib.import_module(name)
        except Exception:  # missing optional parts (e.g. no tkinter): skipped
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, attr, None) if not attr.startswith("_") else None
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for para in prose_paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    picked.append(para)
    return "\n\n".join(picked) + "\n"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_reference(path: str | None) -> Reference:
    """``eval.reference`` (a UTF-8 text file) or, by default, the shipped snapshot."""
    if path is None:
        file = resources.files("sft.evaluation").joinpath("texts", REFERENCE_FILE)
        text = file.read_text("utf-8")
        if _sha256(text) != REFERENCE_SHA256:
            raise SftError(f"{file}: the shipped reference text was modified (its sha256 is not the pinned "
                           f"one); reinstall sft, or set eval.reference to your own text file")
        return Reference(text, REFERENCE_VERSION, REFERENCE_SHA256)
    p = Path(path).expanduser()
    if not p.is_file():
        raise SftError(f"eval.reference: {p} not found; point it at a plain-text file (or leave it unset)")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise SftError(f"eval.reference: {p} is empty; give it a few thousand words of general text")
    return Reference(text, f"file:{p.name}", _sha256(text))


def reference_text(path: str | None) -> str:
    """The text of ``load_reference(path)``."""
    return load_reference(path).text


if __name__ == "__main__":  # python -m sft.evaluation.reference --write PATH
    if sys.argv[1:2] != ["--write"] or len(sys.argv) != 3:
        sys.exit("usage: python -m sft.evaluation.reference --write PATH")
    Path(sys.argv[2]).write_text(stdlib_prose(), encoding="utf-8")
