"""General English text to measure forgetting on: how much did fine-tuning hurt plain language?

By default the text is assembled at run time from the prose in the docstrings of the Python
standard library (nothing is copied into this repository, and nothing is downloaded). Only
paragraphs that read like sentences are kept: no code, no doctest lines, no tables. The result is
deterministic for a given Python version, which is all a before/after comparison needs; set
``eval.reference`` to a text file to pin it across machines.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from sft.errors import SftError

# Standard-library modules with long, plain-English documentation, in a fixed order.
MODULES = (
    "turtle", "json", "argparse", "socket", "unittest", "pydoc", "inspect", "heapq", "sched",
    "subprocess", "doctest", "random", "tempfile", "difflib", "string", "pickle", "threading",
    "logging", "shutil", "collections", "functools", "itertools", "asyncio", "csv", "zipfile",
)
DEFAULT_CHARS = 12_000  # about 3,000 tokens of English


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


def stdlib_prose(max_chars: int = DEFAULT_CHARS) -> str:
    """Prose paragraphs from standard-library docstrings, in a fixed order, up to ``max_chars``."""
    seen: set[str] = set()
    picked: list[str] = []
    total = 0
    per_module = max_chars // 6  # spread over several modules, so no one topic dominates
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # e.g. turtle without tkinter
            continue
        docs = [inspect.getdoc(mod) or ""]
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
        module_chars = 0
        for doc in docs:
            if module_chars >= per_module:
                break
            for para in prose_paragraphs(doc):
                if para in seen:
                    continue
                seen.add(para)
                picked.append(para)
                total += len(para) + 2
                module_chars += len(para) + 2
                if total >= max_chars:
                    return "\n\n".join(picked)
    return "\n\n".join(picked)


def reference_text(path: str | None) -> str:
    """``eval.reference`` (a UTF-8 text file) or, by default, standard-library prose."""
    if path is None:
        text = stdlib_prose()
        if len(text) < 1000:
            raise SftError(
                "eval.reference: could not gather reference text from the Python standard library; "
                "set eval.reference to a plain-text file of general English"
            )
        return text
    p = Path(path).expanduser()
    if not p.is_file():
        raise SftError(f"eval.reference: {p} not found; point it at a plain-text file (or leave it unset)")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise SftError(f"eval.reference: {p} is empty; give it a few thousand words of general text")
    return text
