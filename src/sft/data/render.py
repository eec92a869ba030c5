"""Rendering and tokenizing in bulk: the same text and tokens as one ``apply_chat_template`` and one
tokenizer call per conversation, without their per-call overhead.

- :func:`compiled` renders with the template compiled once (what ``apply_chat_template`` does
  inside, after ~25 us of argument handling per call); it is used only after it rendered probe
  conversations exactly as ``apply_chat_template`` does, and only for messages that need none of
  its rewriting (no tools, no reasoning fields, no None values): anything else, and any template
  error, goes the ordinary way (:func:`sft.data.masks.render`).
- :func:`tokenize_many` encodes many texts in one call of the Rust tokenizer (which releases the
  GIL) and returns numpy arrays, not Python lists of ints.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

Renderer = Callable[[list[dict[str, Any]], bool], str]
REWRITTEN = ("reasoning_content", "thinking", "reasoning")  # apply_chat_template aliases these fields

_PROBES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
     {"role": "assistant", "content": "\nBecause.\n"}, {"role": "user", "content": "Ok"},
     {"role": "assistant", "content": "Bye"}],
]


@lru_cache(maxsize=16)
def compiled(tokenizer: Any, source: str) -> Renderer | None:
    """A renderer for ``source`` that gives ``apply_chat_template(messages, chat_template=source,
    add_generation_prompt=gen, tokenize=False)``, or None when it cannot be vouched for (a
    transformers without the compiled-template helper, or a probe rendered differently)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template, _plain_template_data

        template = _compile_jinja_template(source)
        kwargs = _plain_template_data(dict(tokenizer.special_tokens_map))
    except Exception:  # an older/newer transformers, a template jinja cannot compile
        return None

    def render(messages: list[dict[str, Any]], gen: bool) -> str:
        return str(template.render(messages=messages, tools=None, documents=None, add_generation_prompt=gen, **kwargs))

    try:
        for probe in _PROBES:
            for gen, msgs in ((False, probe), (True, probe[:-1])):
                slow = tokenizer.apply_chat_template(msgs, chat_template=source, add_generation_prompt=gen, tokenize=False)
                if render(msgs, gen) != slow:
                    return None
    except Exception:  # the template refuses a probe: every rendering goes the ordinary way
        return None
    return render


def plain(messages: list[dict[str, Any]], tools: Any) -> bool:
    """Whether ``apply_chat_template`` would hand ``messages`` to the template unchanged.

    >>> plain([{"role": "user", "content": "Hi"}], None), plain([{"role": "user", "content": None}], None)
    (True, False)
    """
    return tools is None and all(
        type(m) is dict and not any(k in m for k in REWRITTEN) and None not in m.values() for m in messages
    )


def tokenize_many(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``sft.data.masks.tokenize`` of each text, in one batch: (ids int32 [n], offsets int64 [n, 2]).

    The tokenizer is called once first so that its backend has the settings of a plain call
    (no truncation or padding, special tokens as configured), then the backend encodes the batch.
    """
    if not texts:
        return []
    if not getattr(tokenizer, "is_fast", False):
        from sft.errors import SftError

        raise SftError("model: exact loss masks need a fast (Rust) tokenizer with offset mappings")
    tokenizer("", add_special_tokens=False)  # sets the backend as an ordinary call does
    backend = tokenizer.backend_tokenizer
    out = []
    for enc in backend.encode_batch(texts, add_special_tokens=False):
        ids = enc.ids  # fromiter over the flat pairs: 3x faster than asarray of a list of tuples
        pairs = np.fromiter(itertools.chain.from_iterable(enc.offsets), np.int64, 2 * len(ids))
        out.append((np.fromiter(ids, np.int32, len(ids)), pairs.reshape(-1, 2)))
    return out


def trained_tokens(offsets: np.ndarray, regions: list[tuple[int, int]]) -> np.ndarray:
    """Which tokens overlap a region (sorted, disjoint char spans): ``labels_for(...) != IGNORE``
    as one vectorised step. offsets [n, 2] -> bool [n].

    >>> trained_tokens(np.array([[0, 2], [2, 4], [4, 6], [6, 8]]), [(3, 6)]).tolist()
    [False, True, True, False]
    """
    if not regions or not len(offsets):
        return np.zeros(len(offsets), dtype=bool)
    spans = np.asarray(regions, dtype=np.int64)
    starts, ends = offsets[:, 0], offsets[:, 1]
    if np.any(np.diff(starts) < 0) or np.any(spans[1:, 0] < spans[:-1, 1]):
        return _sweep(offsets.tolist(), regions)  # unsorted: labels_for's own sweep, as it is
    r = np.searchsorted(spans[:, 1], starts, side="right")  # the first region ending after the token starts
    inside = r < len(spans)
    r = np.minimum(r, len(spans) - 1)
    return inside & (starts < spans[r, 1]) & (ends > spans[r, 0])


def _sweep(offsets: list[list[int]], regions: list[tuple[int, int]]) -> np.ndarray:
    out = np.zeros(len(offsets), dtype=bool)
    r = 0
    for t, (ts, te) in enumerate(offsets):
        while r < len(regions) and regions[r][1] <= ts:
            r += 1
        out[t] = r < len(regions) and ts < regions[r][1] and te > regions[r][0]
    return out


def cut_starts(offsets: np.ndarray, regions: list[tuple[int, int]]) -> list[int]:
    """Region starts that fall strictly inside a token (the reply's first token would merge with the
    prompt's last one; ``sft.data.chat`` tokenizes those texts apart).

    >>> cut_starts(np.array([[0, 3], [3, 5]]), [(2, 5), (3, 5)])
    [2]
    """
    if not len(offsets):
        return []
    a, b = offsets[:, 0], offsets[:, 1]
    return [s for s, _ in regions if bool(np.any((a < s) & (s < b)))]
