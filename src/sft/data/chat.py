"""Conversation -> input_ids + labels: chat templates, reasoning, and exact loss masks.

Any Jinja chat template works as is (no ``{% generation %}`` tags, no per-model rules): the
conversation is rendered exactly as ``tokenizer.apply_chat_template`` renders it, and the trained
text of each assistant turn is what the model writes after the generation prompt, up to and
including the template's end-of-turn marker (see :mod:`sft.data.masks`). When the template renders
history differently from inference (Qwen3 drops earlier reasoning), the conversation becomes one
example per trained turn, so training always sees what inference will show the model. That costs
two renderings per trained turn; plain-text conversations under templates that render every turn
alike take a linear-time path instead (content spans found with placeholders, checked on probes).

Reasoning (``Message.reasoning``) is handed to the template as ``reasoning_content`` (Qwen3) or
``thinking`` (gpt-oss) when the template reads that field, else written into the content as
``<think>\\n...\\n</think>\\n\\n``. ``data.reasoning`` decides which turns keep it: ``keep_last`` (each trained turn keeps its own,
earlier turns in its history do not, as chat clients send history), ``keep_all``, ``drop``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sft.data.masks import (
    common_prefix,
    end_of_turn,
    render,
    special_ids,
    tokenize,
    tokenize_apart,
    turn_texts,
)
from sft.data.reasoning import kept_reasoning, open_reasoning, reasoning_field, template_messages
from sft.data.render import cut_starts, tokenize_many, trained_tokens
from sft.data.spans import turn_regions
from sft.data.types import IGNORE, Conversation, Example, Message
from sft.errors import SftError

if TYPE_CHECKING:
    from sft.config import Config

BUILTIN_TEMPLATES = ("chatml", "gemma", "llama3")
TRAIN_ON = ("assistant", "last_assistant", "all")
_PROBE = [
    Message("user", "Hi there"),
    Message("assistant", "Hello! How can I help?"),
    Message("user", "What is 2+2?"),
    Message("assistant", "4"),
]


# ---------------------------------------------------------------------------------------------
# templates


def resolve_template(template: str, tokenizer: Any, base_dir: str = ".", kwargs: dict[str, Any] | None = None) -> str:
    """``data.template`` -> Jinja source: ``auto`` (the tokenizer's), a built-in, or a .jinja file,
    with ``data.template_kwargs`` written in as defaults (see :func:`with_template_kwargs`).

    >>> "<|im_start|>" in resolve_template("chatml", tokenizer=None)
    True
    """
    source = _resolve(template, tokenizer, base_dir)
    return with_template_kwargs(source, kwargs) if kwargs else source


def config_template(cfg: Config, tokenizer: Any) -> str:
    """The template a run trains with: ``data.template`` for ``tokenizer`` with ``data.template_kwargs``
    (every command that renders the run's rows uses this, so none renders them differently)."""
    return resolve_template(cfg.data.template, tokenizer, cfg.base_dir, cfg.data.template_kwargs)


_KWARGS_HEAD = "{#- sft: data.template_kwargs #}"


def with_template_kwargs(source: str, kwargs: dict[str, Any]) -> str:
    """``source`` preceded by one ``{% if k is not defined %}{% set k = v %}{% endif %}`` per keyword:
    every rendering (training, ``sft generate``, and plain ``apply_chat_template`` on final/'s saved
    template) then uses the value, and a caller can still pass another.

    >>> src = with_template_kwargs("{{ 'T' if enable_thinking else 'F' }}", {"enable_thinking": False})
    >>> src.splitlines()[1]
    '{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}'
    """
    lines = [_KWARGS_HEAD]
    for key, value in kwargs.items():
        if not key.isidentifier():
            raise SftError(f"data.template_kwargs: {key!r} is not a template variable name; use letters, digits and _")
        if value is not None and not isinstance(value, (str, bool, int, float)):
            raise SftError(f"data.template_kwargs.{key}: {value!r} is not a string, number, boolean or null")
        literal = "none" if value is None else json.dumps(value)
        lines.append(f"{{%- if {key} is not defined %}}{{%- set {key} = {literal} %}}{{%- endif %}}")
    return "\n".join(lines) + "\n" + source


def _resolve(template: str, tokenizer: Any, base_dir: str) -> str:
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
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as e:
        raise SftError(f"data.template: {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None




def _source(template: str, tokenizer: Any) -> str:
    """Accept the Jinja source (from resolve_template) or, for convenience, a name or path."""
    return template if ("{{" in template or "{%" in template) else resolve_template(template, tokenizer)


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


Piece = tuple[str, list[tuple[int, int]], int | None, bool]  # (text, char regions, turn, regions are the untrained ones)


def encode_all(
    conv: Conversation, tokenizer: Any, template: str, train_on: str, reasoning: str = "keep_last"
) -> list[Example]:
    """Conversation -> its training examples, with exact labels.

    Usually one example whose ``input_ids == apply_chat_template(messages)``; one per trained turn
    (``meta["turn"]`` = its message index) when the template renders earlier turns differently from
    how it renders a turn the model just wrote: ``apply_chat_template(messages[:turn + 1])``, or the
    history rendered with ``add_generation_prompt=True`` then the turn, where the template renders
    that history differently again (Mistral's system prompt).
    Labels are aligned with input_ids, IGNORE where untrained; the first label is always IGNORE.
    ``conv.is_text``: the content, tokenized as the tokenizer normally does (with BOS if it adds
    one), plus EOS; every token is trained.
    """
    if conv.is_text:
        text = "".join(m.content for m in conv.messages)
        ids = list(tokenizer(text)["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return [Example(ids, [IGNORE, *ids[1:]], source=conv.source, line=conv.line)]
    pieces = plan_all(conv, tokenizer, template, train_on, reasoning)
    out = []
    for piece, (tokens, offsets) in zip(pieces, tokenize_many(tokenizer, [p[0] for p in pieces])):
        tokens, trained, merged = finish(tokenizer, piece, tokens, offsets)
        ex = Example(tokens.tolist(), np.where(trained, tokens, IGNORE).tolist(), source=conv.source, line=conv.line)
        if piece[2] is not None:
            ex.meta["turn"] = piece[2]
        if merged:
            ex.meta["merged_starts"] = merged
        out.append(ex)
    return out


def finish(tokenizer: Any, piece: Piece, ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A planned piece and its tokens (ids [n], char offsets [n, 2]) -> (ids, trained bool [n],
    reply starts tokenized apart). Position 0 is never trained (the loss predicts labels[1:])."""
    text, regions, _, untrained = piece
    over = trained_tokens(offsets, regions)
    merged = 0
    if untrained:  # train_on: all: every token except the text of train: false messages
        over = ~over
    else:
        # a reply whose first token would merge with the prompt's last one ("<think>\n" + "\n</think>"
        # -> "\n\n"): inference tokenizes the prompt alone, so the text is tokenized apart there
        cuts = cut_starts(offsets, regions)
        if cuts:
            apart, spans = tokenize_apart(tokenizer, text, cuts)
            ids, offsets = np.asarray(apart, dtype=np.int32), np.asarray(spans, dtype=np.int64).reshape(-1, 2)
            over, merged = trained_tokens(offsets, regions), len(cuts)
    if len(over):
        over[0] = False
    return ids, over, merged


def plan_all(conv: Conversation, tokenizer: Any, template: str, train_on: str, reasoning: str = "keep_last") -> list[Piece]:
    """The texts :func:`encode_all` tokenizes for ``conv`` (not a ``text`` row) and their char
    regions: the trained ones, or with ``train_on: all`` the untrained ones."""
    where = conv.location() if conv.source else "data"
    msgs = conv.messages
    if not msgs:
        raise SftError(f"{where}: the conversation has no messages; drop the row or add messages")
    source = _source(template, tokenizer)
    flags = _trained_flags(msgs, train_on)
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=len(msgs) - 1)
    view = template_messages(msgs, kept_reasoning(msgs, reasoning, last), reasoning_field(source))
    rendered = render(tokenizer, source, view, conv.tools, False, where)
    missing = [n for n in tool_names(conv.tools) if n not in rendered]
    if missing:  # the model would be trained to use (or decline) tools its prompt never shows
        raise SftError(f"{where}: the row's tools ({', '.join(repr(n) for n in missing[:3])}) are not in the prompt: "
                       "this chat template does not write tools; use a template with tools (chatml, llama3, or the "
                       "model's own if it has them)")
    for i, m in enumerate(msgs):
        if any(c.get("function", c).get("name", "") not in rendered for c in m.tool_calls or []):
            raise SftError(f"{where}: messages[{i}] has tool calls, which this chat template does not write; "
                           "use a template with tool calls (chatml, llama3, or the model's own if it has them)")
    if train_on == "all":  # every token except the text of train: false messages
        marker = end_of_turn(tokenizer, source) or ""
        regions = []
        for i, text, start, end in turn_texts(msgs, tokenizer, source, conv.tools, reasoning, [i for i, f in enumerate(flags) if not f], where):
            if not rendered.startswith(text[:end]):
                raise SftError(f"{where}: messages[{i}] has train: false, which train_on: all cannot honour with "
                               "this template (it renders earlier turns differently); use train_on: assistant")
            regions.append((start, end - len(marker) if text.endswith(marker, 0, end) else end))
        return [(rendered, sorted(regions), None, True)]
    trained = [i for i, f in enumerate(flags) if f]
    fast = turn_regions(msgs, tokenizer, source, view, conv.tools, rendered, trained, where)
    if fast is not None:
        return [(rendered, fast, None, False)]
    turns = turn_texts(msgs, tokenizer, source, conv.tools, reasoning, trained, where)
    if all(rendered.startswith(text[:end]) for _, text, _, end in turns):
        return [(rendered, [(s, e) for _, _, s, e in turns], None, False)]
    return [(text, [(s, e)], i, False) for i, text, s, e in turns]


def tool_names(tools: Any) -> list[str]:
    """The names of a row's tools (OpenAI's ``{"type": "function", "function": {...}}`` or a bare schema).

    >>> tool_names([{"type": "function", "function": {"name": "add"}}, {"name": "search"}, "junk"])
    ['add', 'search']
    """
    out = []
    for t in tools or []:
        spec = t.get("function", t) if isinstance(t, dict) else None
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name:
            out.append(name)
    return out


def encode(conv: Conversation, tokenizer: Any, template: str, train_on: str, reasoning: str = "keep_last") -> Example:
    """:func:`encode_all` for a conversation that is one example (an SftError if it is not)."""
    out = encode_all(conv, tokenizer, template, train_on, reasoning)
    if len(out) != 1:
        raise SftError(f"{conv.location()}: this conversation is trained as {len(out)} examples (one per turn); use encode_all")
    return out[0]


def prompt_ids(messages: list[Message], tokenizer: Any, template: str, tools: Any = None, reasoning: str = "keep_last") -> list[int]:
    """Token ids of ``messages`` rendered with add_generation_prompt=True: what the model sees
    before it writes its reply (history reasoning as ``data.reasoning`` trained it)."""
    source = _source(template, tokenizer)
    keep = kept_reasoning(messages, reasoning, len(messages) - 1) if reasoning == "keep_all" else set()
    text = render(tokenizer, source, template_messages(messages, keep, reasoning_field(source)), tools, True, "prompt")
    return tokenize(tokenizer, text)[0]


def end_of_turn_tokens(tokenizer: Any, template: str) -> tuple[str | None, list[int]]:
    """The end-of-turn marker a template writes after every assistant turn and its token ids
    (one special token, or several plain-text tokens), as trained."""
    marker = end_of_turn(tokenizer, _source(template, tokenizer))
    return marker, (tokenize(tokenizer, marker)[0] if marker else [])


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """The ids that end an assistant turn under this template, plus ``tokenizer.eos_token_id``.

    A marker of several plain-text tokens has no single stop id; only EOS is returned for it
    (generation stops on its text instead: :func:`stop_strings`).
    """
    _, ids = end_of_turn_tokens(tokenizer, template)
    out = ids if len(ids) == 1 else []
    if tokenizer.eos_token_id is not None:
        out = [*out, int(tokenizer.eos_token_id)]
    return list(dict.fromkeys(out))



def stop_strings(tokenizer: Any, template: str) -> list[str]:
    """The end-of-turn marker as text when it is not one special token (generation then stops on
    the decoded text, :func:`sft.evaluation.reasoning.cut_at_text`); else []."""
    marker, ids = end_of_turn_tokens(tokenizer, template)
    if marker is None or (len(ids) == 1 and ids[0] in special_ids(tokenizer)):
        return []
    return [marker]


def lint(tokenizer: Any, template: str, examples: Sequence[Example] | None = None) -> list[str]:
    """Human-readable warnings about a template (and, if given, encoded examples)."""
    source = _source(template, tokenizer)
    warnings: list[str] = []
    where = "data.template"
    msgs = [m.to_template() for m in _PROBE]
    full = render(tokenizer, source, msgs, None, False, where)
    if len(encode_all(Conversation(_PROBE), tokenizer, source, "assistant")) > 1:
        warnings.append(
            f"{where}: not prefix-preserving: the template renders earlier turns differently from a turn the "
            "model just wrote, so multi-turn conversations are trained as one example per assistant turn "
            "(history as inference renders it; tokens grow with the square of the turns)"
        )
    prompt = render(tokenizer, source, msgs[:1], None, True, where)
    turn = render(tokenizer, source, msgs[:2], None, False, where)
    if not turn.startswith(prompt) and open_reasoning(prompt) is None:  # an open <think> is trained after
        extra = prompt[common_prefix(prompt, turn):]
        warnings.append(
            f"{where}: the generation prompt ends with {extra!r}, which the template never renders in an "
            "assistant turn, so the model is prompted at inference with text it was not trained after"
        )
    thought = [Message("user", "2+2?"), Message("assistant", "4", reasoning="Two plus two.")]
    try:
        (ex,) = encode_all(Conversation(thought), tokenizer, source, "assistant")
    except SftError:  # thinking is off (the generation prompt closes an empty block): rows with
        # reasoning are refused by name when they are encoded; rows without it train as usual
        warnings.append(f"{where}: thinking is off in this template, so rows with reasoning are refused")
    else:
        if "Two plus two." not in tokenizer.decode([t for t in ex.labels if t != IGNORE]):
            warnings.append(f"{where}: the template drops reasoning from assistant turns, so reasoning in the data is not trained")
    marker, eot_ids = end_of_turn_tokens(tokenizer, source)
    bos = tokenizer.bos_token_id
    ids = tokenize(tokenizer, full)[0]
    if bos is not None and ids[:2] == [bos, bos]:
        warnings.append(f"{where}: the rendered chat starts with two BOS tokens; remove one from the template")
    if marker is None:
        warnings.append(
            f"{where}: the template writes no end-of-turn marker after an assistant turn, so a trained model "
            "will not know when to stop; use a template that ends turns with one (chatml, gemma, llama3)"
        )
    elif not (len(eot_ids) == 1 and eot_ids[0] in special_ids(tokenizer)):
        warnings.append(
            f"{where}: the end-of-turn marker {marker!r} is not a special token of this tokenizer but "
            f"{len(eot_ids)} text tokens: it is trained, and generation (no single stop id) stops on its decoded text"
        )
    zero: list[str] = []
    no_eot: list[str] = []
    double: list[str] = []
    merged: list[str] = []
    from sft.data.store import Examples

    if isinstance(examples, Examples) and (marker is None or len(eot_ids) == 1):  # from the token store: as arrays
        flags = examples.scan(bos, eot_ids[0] if marker else None)
        zero, no_eot, double, merged = (_Found(examples, flags[k]) for k in ("zero", "no_eot", "double_bos", "merged"))
        examples = None
    for ex in examples or []:
        loc = f"{ex.source}:{ex.line}"
        if ex.num_trained == 0:
            zero.append(loc)
        elif marker and not _trains(tokenizer, ex.labels, marker, eot_ids):
            no_eot.append(loc)
        if bos is not None and ex.input_ids[:2] == [bos, bos]:
            double.append(loc)
        if ex.meta.get("merged_starts"):
            merged.append(loc)
    for locs, what in (
        (zero, "rows have zero trained tokens (check data.train_on and per-message train: false)"),
        (no_eot, "rows never train an end-of-turn marker, so the model will not learn to stop"),
        (double, "rows start with two BOS tokens"),
        (merged, "rows have a reply whose first token would merge with the end of the prompt (e.g. a reply "
                 "starting with a newline); tokenized apart there, as inference tokenizes the prompt alone"),
    ):
        if locs:
            listed = ", ".join(locs[:5]) + (f" and {len(locs) - 5} more" if len(locs) > 5 else "")
            warnings.append(f"{len(locs)} {what}: {listed}")
    return warnings


class _Found(list):  # type: ignore[type-arg]
    """The locations of the examples where ``flag`` is set, as ``lint`` lists them: the first
    five (made from the store), and how many there are."""

    def __init__(self, examples: Sequence[Example], flag: Any) -> None:
        at = np.flatnonzero(flag)
        super().__init__(f"{examples[i].source}:{examples[i].line}" for i in at[:5].tolist())
        self.total = len(at)

    def __len__(self) -> int:
        return self.total


def _trains(tokenizer: Any, labels: list[int], marker: str, ids: list[int]) -> bool:
    """Whether ``labels`` train the end-of-turn marker (a text marker may merge with the text
    before it into other tokens, so it is looked for in the decoded trained runs)."""
    if len(ids) == 1:
        return ids[0] in labels
    runs, run = [], []
    for lab in [*labels, IGNORE]:
        if lab != IGNORE:
            run.append(lab)
        elif run:
            runs.append(run)
            run = []
    return any(marker in tokenizer.decode(r) for r in runs)
