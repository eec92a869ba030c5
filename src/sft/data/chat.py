"""Conversation -> input_ids + labels: chat templates and exact loss masks.

The mask works for any Jinja chat template, without ``{% generation %}`` tags or per-model rules:

1. render the conversation for real (R), exactly as ``tokenizer.apply_chat_template`` does;
2. render it again with every message content replaced by a unique placeholder made of
   private-use characters (no whitespace, so ``| trim`` leaves it alone) and split that render on
   the placeholders into template fragments;
3. walk R matching fragment, content (as is or trimmed), fragment, ... which gives the exact
   character span of every message content, in time linear in the conversation;
4. tokenize R once with offsets; a token is trained if it overlaps a trained content span or the
   template text that follows it up to and including the end-of-turn token (the first special
   token after the content; tool calls rendered after the content are thus trained too).

If the template changes content in other ways (truncates, rewrites), step 3 fails and the spans
come from rendering prefixes of the conversation instead (quadratic, but exact when the template is
prefix-preserving). Masks never depend on token ids (SmolLM2's pad == eos).
"""

from __future__ import annotations

import bisect
import difflib
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from sft.data.types import IGNORE, Conversation, Example, Message
from sft.errors import SftError

BUILTIN_TEMPLATES = ("chatml", "gemma", "llama3")
TRAIN_ON = ("assistant", "last_assistant", "all")

Span = tuple[int, int]  # [start, end) in characters of the rendered text

# Placeholder i = OPEN + digits of i as private-use chars + CLOSE: no whitespace, never in real text.
_OPEN, _CLOSE, _DIGIT0 = "\ue000", "\ue001", 0xE010
_PLACEHOLDER_RE = re.compile("\ue000([\ue010-\ue019]+)\ue001")
_PROBE = [
    Message("user", "Hi there"),
    Message("assistant", "Hello! How can I help?"),
    Message("user", "What is 2+2?"),
    Message("assistant", "4"),
]


# ---------------------------------------------------------------------------------------------
# templates


def resolve_template(template: str, tokenizer: Any, base_dir: str = ".") -> str:
    """``data.template`` -> Jinja source: ``auto`` (the tokenizer's), a built-in, or a .jinja file.

    >>> "<|im_start|>" in resolve_template("chatml", tokenizer=None)
    True
    """
    if template == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise SftError(
                "data.template: 'auto' but the tokenizer has no chat template (a base model like "
                "gemma-3-270m has none); set data.template: chatml|gemma|llama3|path/to/template.jinja"
            )
        return str(source)
    if template in BUILTIN_TEMPLATES:
        return resources.files("sft").joinpath("templates", f"{template}.jinja").read_text("utf-8")
    path = Path(template).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        hint = difflib.get_close_matches(template, [*BUILTIN_TEMPLATES, "auto"], n=1)
        fix = f"did you mean {hint[0]!r}? " if hint else ""
        raise SftError(
            f"data.template: {template!r} is not a built-in template and {path} is not a file; "
            f"{fix}use auto, chatml, gemma, llama3 or a path to a .jinja file"
        )
    return path.read_text("utf-8")


def _source(template: str, tokenizer: Any) -> str:
    """Accept the Jinja source (from resolve_template) or, for convenience, a name or path."""
    return template if ("{{" in template or "{%" in template) else resolve_template(template, tokenizer)


def _render(tokenizer: Any, source: str, messages: list[dict[str, Any]], tools: Any, gen: bool, where: str) -> str:
    if not messages:
        return ""
    try:
        out = tokenizer.apply_chat_template(
            messages, chat_template=source, tools=tools, add_generation_prompt=gen, tokenize=False
        )
    except Exception as e:  # jinja2 errors, raise_exception(...) in the template
        raise SftError(
            f"{where}: the chat template failed on this conversation: {e}; "
            "fix the row or choose another data.template"
        ) from None
    return str(out)


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """Token ids exactly as apply_chat_template(tokenize=True) makes them, with char offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise SftError("model: exact loss masks need a fast (Rust) tokenizer with offset mappings")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


@lru_cache(maxsize=8)
def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Special ids and added special tokens (Gemma's <end_of_turn> is only the latter)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(ids)


# ---------------------------------------------------------------------------------------------
# content spans


def _placeholder(i: int) -> str:
    return _OPEN + "".join(chr(_DIGIT0 + int(d)) for d in str(i)) + _CLOSE


def _variants(content: str) -> list[str]:
    out: list[str] = []
    for v in (content, content.strip(), content.lstrip(), content.rstrip()):
        if v not in out:
            out.append(v)
    return out


def _walk(rendered: str, frags: list[str], order: list[int], contents: list[str]) -> list[Span] | None:
    """Match frags[0], contents[order[0]], frags[1], ... against ``rendered``; the span of each content.

    Backtracks over the trim variants when a choice leads nowhere (rare; bounded to stay linear).
    """
    if not rendered.startswith(frags[0]):
        return None
    n = len(order)
    spans: list[Span] = [(0, 0)] * n
    choice = [0] * n
    starts: list[int] = []
    k, pos, budget = 0, len(frags[0]), 8 * n + 64
    while k < n:
        options = _variants(contents[order[k]])
        placed = False
        while choice[k] < len(options) and budget > 0:
            v = options[choice[k]]
            choice[k] += 1
            budget -= 1
            end = pos + len(v)
            nxt = frags[k + 1]
            last_ok = k < n - 1 or end + len(nxt) == len(rendered)
            if rendered.startswith(v, pos) and rendered.startswith(nxt, end) and last_ok:
                spans[k] = (pos, end)
                starts.append(pos)
                pos, k, placed = end + len(nxt), k + 1, True
                break
        if not placed:
            if not starts or budget <= 0:
                return None
            choice[k] = 0
            k -= 1
            pos = starts.pop()
    return spans


def _content_spans(
    tokenizer: Any, source: str, msgs: list[dict[str, Any]], tools: Any, rendered: str, where: str
) -> list[list[Span]] | None:
    """Per message, the char spans of its content in ``rendered`` (placeholder method), or None."""
    contents = [str(m.get("content") or "") for m in msgs]
    if any(_OPEN in c or _CLOSE in c for c in contents):
        return None
    masked = [{**m, "content": _placeholder(i)} for i, m in enumerate(msgs)]
    try:
        ph = _render(tokenizer, source, masked, tools, False, where)
    except SftError:
        return None  # the template looks at content (e.g. validates it): use the prefix method
    parts = _PLACEHOLDER_RE.split(ph)
    frags = parts[0::2]
    order = [int("".join(str(ord(c) - _DIGIT0) for c in d)) for d in parts[1::2]]
    if any(i >= len(msgs) for i in order):
        return None
    spans = _walk(rendered, frags, order, contents)
    if spans is None:
        return None
    out: list[list[Span]] = [[] for _ in msgs]
    for i, span in zip(order, spans):
        out[i].append(span)
    return out


def _prefix_regions(
    tokenizer: Any, source: str, msgs: list[dict[str, Any]], tools: Any, rendered: str, where: str
) -> list[list[Span]]:
    """Fallback: message k's region is what rendering msgs[:k+1] adds after the generation prompt."""
    out: list[list[Span]] = []
    before = ""
    for k in range(len(msgs)):
        after = _render(tokenizer, source, msgs[: k + 1], tools, False, where)
        if not (rendered.startswith(after) and after.startswith(before)):
            raise SftError(
                f"{where}: cannot locate message {k} in the rendered chat: the template rewrites message "
                "content and is not prefix-preserving (rendering the first messages is not a prefix of the "
                "full rendering); use data.template: chatml|gemma|llama3 or a template without that logic"
            )
        head = _render(tokenizer, source, msgs[:k], tools, True, where) if k else ""
        start = len(head) if (head and after.startswith(head)) else len(before)
        out.append([(start, len(after))])
        before = after
    return out


# ---------------------------------------------------------------------------------------------
# masks


def _trained_flags(messages: list[Message], train_on: str) -> list[bool]:
    if train_on not in TRAIN_ON:
        raise SftError(f"data.train_on: {train_on!r} is not allowed; use one of {', '.join(TRAIN_ON)}")
    if train_on == "all":
        return [m.train is not False for m in messages]
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return [
        m.train is True or (m.train is None and m.role == "assistant" and (train_on == "assistant" or i == last))
        for i, m in enumerate(messages)
    ]


def _first_index_at(offsets: list[Span], char: int, lo: int = 0) -> int:
    """The first token index >= lo whose start is >= char (offsets are sorted)."""
    hi = len(offsets)
    while lo < hi:
        mid = (lo + hi) // 2
        if offsets[mid][0] < char:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _regions(
    spans: list[list[Span]], flags: list[bool], ids: list[int], offsets: list[Span], special: frozenset[int],
    extend: bool,
) -> tuple[list[Span], list[int | None]]:
    """Trained char regions and, per trained content span, the end-of-turn token id found (or None).

    With ``extend`` a content span grows to the end of the first special token after it, if that
    token comes before the next message content starts.
    """
    starts = sorted(s for per in spans for s, _ in per)
    regions: list[Span] = []
    eots: list[int | None] = []
    for per, flag in zip(spans, flags):
        for s, e in per:
            if not flag:
                continue
            if not extend:
                regions.append((s, e))
                continue
            nxt_i = bisect.bisect_right(starts, s)  # the next message content starts there
            limit = starts[nxt_i] if nxt_i < len(starts) else float("inf")
            eot: int | None = None
            t = _first_index_at(offsets, e)
            while t < len(ids) and offsets[t][0] < limit:
                if ids[t] in special:
                    eot = ids[t]
                    e = offsets[t][1]
                    break
                t += 1
            regions.append((s, e))
            eots.append(eot)
    return sorted(regions), eots


def _labels(ids: list[int], offsets: list[Span], regions: list[Span]) -> list[int]:
    """ids where a token overlaps a region, else IGNORE; one sweep (both lists sorted)."""
    labels = [IGNORE] * len(ids)
    r = 0
    for t, (ts, te) in enumerate(offsets):
        while r < len(regions) and regions[r][1] <= ts:
            r += 1
        if r < len(regions) and ts < regions[r][1] and te > regions[r][0]:
            labels[t] = ids[t]
    return labels


def _encode_chat(
    messages: list[Message], tokenizer: Any, source: str, train_on: str, tools: Any, where: str
) -> tuple[list[int], list[int], list[int | None], str]:
    """(input_ids, labels, end-of-turn id per trained span, method) for a chat conversation."""
    msgs = [m.to_template() for m in messages]
    rendered = _render(tokenizer, source, msgs, tools, False, where)
    ids, offsets = _tokenize(tokenizer, rendered)
    flags = _trained_flags(messages, train_on)
    special = _special_ids(tokenizer)
    spans = _content_spans(tokenizer, source, msgs, tools, rendered, where)
    method = "placeholder"
    if spans is None:
        spans, method = _prefix_regions(tokenizer, source, msgs, tools, rendered, where), "prefix"
    regions, eots = _regions(spans, flags, ids, offsets, special, extend=method == "placeholder")
    if method == "prefix":  # a region is a whole turn: stop after its last special token
        eots = []
        trimmed = []
        for s, e in regions:
            inside = [t for t in range(_first_index_at(offsets, s), len(ids)) if offsets[t][0] < e]
            last = max((t for t in inside if ids[t] in special), default=None)
            eots.append(ids[last] if last is not None else None)
            trimmed.append((s, offsets[last][1]) if last is not None else (s, e))
        regions = trimmed
    if train_on == "all":
        untrained = sorted((s, e) for per, f in zip(spans, flags) if not f for s, e in per)
        opted_out = _labels(ids, offsets, untrained)  # the contents of train: false messages
        labels = [IGNORE if o != IGNORE else i for i, o in zip(ids, opted_out)]
    else:
        labels = _labels(ids, offsets, regions)
    if labels:
        labels[0] = IGNORE  # position 0 is never a target (the loss predicts labels[1:])
    return ids, labels, eots, method


def encode(conv: Conversation, tokenizer: Any, template: str, train_on: str) -> Example:
    """Conversation -> Example with ``input_ids == apply_chat_template(messages)`` and exact labels.

    ``template`` is the Jinja source from :func:`resolve_template` (a name or path also works).
    Labels are aligned with input_ids, IGNORE where untrained; the first label is always IGNORE.
    ``conv.is_text``: the content, tokenized as the tokenizer normally does (with BOS if it adds
    one), plus EOS; every token is trained.
    """
    where = conv.location() if conv.source else "data"
    if conv.is_text:
        text = "".join(m.content for m in conv.messages)
        ids = list(tokenizer(text)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        labels = [IGNORE, *ids[1:]]
        return Example(ids, labels, source=conv.source, line=conv.line)
    if not conv.messages:
        raise SftError(f"{where}: the conversation has no messages; drop the row or add messages")
    source = _source(template, tokenizer)
    ids, labels, _, method = _encode_chat(conv.messages, tokenizer, source, train_on, conv.tools, where)
    ex = Example(ids, labels, source=conv.source, line=conv.line)
    if method != "placeholder":
        ex.meta["mask_method"] = method
    return ex


def prompt_ids(messages: list[Message], tokenizer: Any, template: str, tools: Any = None) -> list[int]:
    """Token ids of ``messages`` rendered with add_generation_prompt=True: what the model sees
    before it writes its reply."""
    source = _source(template, tokenizer)
    text = _render(tokenizer, source, [m.to_template() for m in messages], tools, True, "prompt")
    return _tokenize(tokenizer, text)[0]


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """The ids that end an assistant turn under this template, plus ``tokenizer.eos_token_id``."""
    source = _source(template, tokenizer)
    _, _, eots, _ = _encode_chat(_PROBE, tokenizer, source, "assistant", None, "data.template")
    out = [t for t in eots if t is not None]
    if tokenizer.eos_token_id is not None:
        out.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(out))


def lint(tokenizer: Any, template: str, examples: list[Example] | None = None) -> list[str]:
    """Human-readable warnings about a template (and, if given, encoded examples)."""
    source = _source(template, tokenizer)
    warnings: list[str] = []
    where = "data.template"
    msgs = [m.to_template() for m in _PROBE]
    full = _render(tokenizer, source, msgs, None, False, where)
    for k in range(1, len(msgs)):
        if not full.startswith(_render(tokenizer, source, msgs[:k], None, False, where)):
            warnings.append(
                f"{where}: not prefix-preserving: rendering the first {k} messages is not a prefix of the full "
                "conversation, so a model sees different tokens at generation time than in training"
            )
            break
    ids, _, eots, _ = _encode_chat(_PROBE, tokenizer, source, "assistant", None, where)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        warnings.append(f"{where}: the rendered chat starts with two BOS tokens; remove one from the template")
    if any(e is None for e in eots):
        warnings.append(
            f"{where}: the assistant turn never emits a special end-of-turn token, so a trained model will "
            "not know when to stop; use a template that ends turns with one (chatml, gemma, llama3)"
        )
    stops = set(stop_token_ids(tokenizer, source))
    zero, no_eot, double = [], [], []
    for ex in examples or []:
        loc = f"{ex.source}:{ex.line}"
        if ex.num_trained == 0:
            zero.append(loc)
        elif not any(lab in stops for lab in ex.labels if lab != IGNORE):
            no_eot.append(loc)
        if bos is not None and ex.input_ids[:2] == [bos, bos]:
            double.append(loc)
    for locs, what in (
        (zero, "rows have zero trained tokens (check data.train_on and per-message train: false)"),
        (no_eot, "rows never train an end-of-turn token, so the model will not learn to stop"),
        (double, "rows start with two BOS tokens"),
    ):
        if locs:
            shown = ", ".join(locs[:5]) + (f" and {len(locs) - 5} more" if len(locs) > 5 else "")
            warnings.append(f"{len(locs)} {what}: {shown}")
    return warnings
