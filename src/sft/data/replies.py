"""What a trained reply says wrong: the per-reply checks of the data quality analysis
(``sft.data.quality``): empty, cut off, boilerplate, unfilled placeholders. Each takes one
Conversation and returns why, or None.
"""

from __future__ import annotations

import json
import re

from sft.data.overlap import WORD
from sft.data.types import Conversation, Message

# AI self-references that teach a model to talk like another model (case-insensitive, apostrophes
# straightened); stock refusals come from sft.data.refusals.REFUSAL_PHRASES.
BOILERPLATE: tuple[str, ...] = (
    "as an ai language model",
    "as a language model",
    "as an ai assistant",
    "as an ai,",
    "as an artificial intelligence",
    "i am an ai language model",
    "i'm an ai language model",
    "i am just an ai",
    "i'm just an ai",
    "i am only an ai",
    "i'm only an ai",
    "i am a large language model",
    "i'm a large language model",
    "i was trained by openai",
    "i was developed by openai",
    "i was created by openai",
    "i am chatgpt",
    "i'm chatgpt",
    "my knowledge cutoff",
    "my knowledge cut-off",
    "as of my last update",
    "as of my last knowledge update",
    "as of my training data",
    "i don't have personal opinions",
    "i do not have personal opinions",
    "i don't have personal experiences",
    "i do not have personal experiences",
    "i don't have feelings",
    "i do not have feelings",
    "i don't have access to real-time",
    "i do not have access to real-time",
    "i don't have the ability to browse",
    "i do not have the ability to browse",
    "i cannot browse the internet",
    "i can't browse the internet",
)
# whole replies that stand for no reply
EMPTY_PLACEHOLDERS = frozenset({"n/a", "na", "null", "nan", "none.", "todo", "tbd", "<noinput>", "<nooutput>",
                                "<no output>", "no output", "undefined", "[deleted]", "[removed]", "..."})
# words a finished sentence does not end on
DANGLING = frozenset((
    "the", "a", "an", "and", "or", "but", "of", "to", "in", "on", "at", "by", "for", "from", "with", "as",
    "that", "which", "who", "whose", "whom", "is", "are", "was", "were", "be", "been", "being", "this",
    "these", "those", "their", "its", "his", "her", "our", "your", "my", "if", "than", "then", "because",
    "so", "while", "when", "where", "into", "onto", "about", "between", "such", "very",
))
CLOSERS = ".!?)]}\"'`*»”’…>|"  # a reply that ends on one of these was not cut mid-sentence
_BRACKETS = re.compile(r"[()\[\]{}]")
# An unfilled template variable: {{name}}, {{ user.name }}. Not {{{raw}}}, {{#each}}, {{ x | upper }}
# (template code, not a value left out), nor TeX's x^{{2}}, x_{{i}} or \frac{{a}}{b}. Right after a
# letter it counts: "我是{{name}}" (Chinese has no spaces), "Total: ${{amount}}".
MUSTACHE = re.compile(r"(?<![\\^_{])\{\{\s*[\w.]*\w[\w.]*\s*\}\}(?!\})")
_TEX_BEFORE = re.compile(r"\\[A-Za-z]+(?:\{[^{}\n]*\})*$")  # \frac, \frac{1}: a TeX argument follows
# A fill-in addressed to a person: [Your Name], [insert date], <YOUR COMPANY> (at most FILL_IN_WORDS
# words). Not a Markdown link ([your settings](url), [your x][1], [your x]: url).
FILL_IN = re.compile(r"\[\s*(?:your|insert)\s+[^\s\[\]][^\[\]\n]*?\s*\](?![(\[:])"
                     r"|<\s*(?:your|insert)\s+[^\s<>][^<>\n]*?\s*>", re.IGNORECASE)
FILL_IN_WORDS = 5
# code is quoted, not said: a reply teaching Jinja, Go templates, Handlebars or Vue writes {{ x }} there
_CODE = re.compile(r"(```|~~~).*?(?:\1|\Z)|`[^`\n]+`", re.DOTALL)
# what may stand before a fill-in that is a slot of a form: a bullet, a label ("Date:", "**Date:**")
_SLOT_PREFIX = re.compile(r"[-*+>#\d.)\s]*(?:[^:\n]{1,40}:[*_]*)?\s*")


def trained_replies(conv: Conversation) -> list[tuple[int, Message]]:
    """(index, message) of the assistant turns that can be trained (not ``train: false``)."""
    return [(i, m) for i, m in enumerate(conv.messages) if m.role == "assistant" and m.train is not False]


def _last(conv: Conversation, role: str) -> Message | None:
    return next((m for m in reversed(conv.messages) if m.role == role), None)


def empty_reason(conv: Conversation) -> str | None:
    """Why a trained reply is empty, or None.

    >>> empty_reason(Conversation([Message("user", "q"), Message("assistant", " ... ")]))
    "messages[1] (assistant) has no words: '...'"
    >>> empty_reason(Conversation([Message("user", "q"), Message("assistant", "4")])) is None
    True
    """
    for i, m in enumerate(conv.messages):
        if m.role != "assistant" or m.train is False or m.tool_calls:
            continue
        text = m.content.strip()
        if not WORD.search(text):
            return f"messages[{i}] (assistant) has no words: {text[:40]!r}"
        if text.lower() in EMPTY_PLACEHOLDERS:
            return f"messages[{i}] (assistant) is a placeholder: {text[:40]!r}"
    return None


def _unclosed(text: str) -> str | None:
    """The first bracket left open at the end of ``text`` (stray closers are ignored).

    >>> _unclosed("f(x) = [1, 2"), _unclosed("1) a 2) b"), _unclosed("{'a': (1)}")
    ('[', None, None)
    """
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in _BRACKETS.findall(text):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and stack and stack[-1] == pairs[ch]:
            stack.pop()
    return stack[0] if stack else None


def _json_body(text: str) -> str:
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    return fence.group(1) if fence else body


def truncation_reason(conv: Conversation, cut: bool = False) -> str | None:
    """Why the last trained reply of ``conv`` looks cut off, or None.

    >>> def c(reply, system=None):
    ...     msgs = ([Message("system", system)] if system else []) + [Message("user", "q"), Message("assistant", reply)]
    ...     return Conversation(msgs)
    >>> truncation_reason(c("The best way to start is to")), truncation_reason(c("It is 4."))
    ("ends on 'to': cut mid-sentence", None)
    >>> print(truncation_reason(c('{"a": 1', system="Answer in JSON.")))
    the system prompt asks for JSON and the reply does not parse (Expecting ',' delimiter at char 7)
    >>> truncation_reason(c("```python\\nprint(1)"))
    'unclosed ``` code fence'
    """
    replies = trained_replies(conv)
    if cut:
        return "cut at data.max_length: the example is longer"
    if not replies or conv.is_text:
        return None
    _, msg = replies[-1]
    text = msg.content.strip()
    if not text or msg.tool_calls:
        return None
    if text.count("```") % 2:
        return "unclosed ``` code fence"
    system = next((m.content for m in conv.messages if m.role == "system"), "")
    prompt = _last(conv, "user")
    wants_json = bool(re.search(r"\bjson\b", system, re.I)) and not conv.tools
    body = _json_body(text)
    starts_json = body[:1] in "{[" and prompt is not None and re.search(r"\bjson\b", prompt.content, re.I)
    if wants_json or starts_json:
        try:
            json.loads(body)
        except json.JSONDecodeError as e:
            who = "system prompt" if wants_json else "prompt"
            return f"the {who} asks for JSON and the reply does not parse ({e.msg} at char {e.pos})"
    if "```" not in text:  # code has its own brackets and endings
        open_ = _unclosed(text)
        if open_:
            return f"unclosed {open_!r}"
    last = text[-1]
    if last in ",;:-–(":
        return f"ends on {last!r}: cut mid-sentence"
    words = text.split()
    if len(words) >= 3 and last.isalpha() and words[-1].lower() in DANGLING:
        return f"ends on {words[-1]!r}: cut mid-sentence"
    return None


def ends_open(conv: Conversation) -> bool:
    replies = trained_replies(conv)
    text = replies[-1][1].content.rstrip() if replies else ""
    return bool(text) and text[-1] not in CLOSERS


def boilerplate_reason(conv: Conversation, phrases: tuple[str, ...], refusals: tuple[str, ...]) -> str | None:
    """The first boilerplate phrase a trained reply says, or None (refusals allowed in harmful rows).

    >>> c = Conversation([Message("user", "q"), Message("assistant", "As an AI language model, I think so.")])
    >>> boilerplate_reason(c, BOILERPLATE, ())
    'messages[1] (assistant) says "as an ai language model"'
    """
    from sft.data.refusals import normalize

    check = phrases if conv.category == "harmful" else phrases + refusals
    for i, m in enumerate(conv.messages):
        if m.role != "assistant" or m.train is False:
            continue
        text = normalize(m.content)
        for p in check:
            if p in text:
                return f'messages[{i}] (assistant) says "{p}"'
    return None


def reply_words(conv: Conversation) -> int:
    """Words of the trained replies (of the document, for ``text`` rows): the length of a row
    when trained tokens are not known."""
    if conv.is_text:
        return len(conv.messages[0].content.split())
    return sum(len(m.content.split()) for _, m in trained_replies(conv))


def placeholders(text: str) -> list[str]:
    """The distinct unfilled placeholders of ``text``, in order: ``{{ identifier }}`` anywhere
    outside code (fences and inline code), and fill-ins for a person (``[Your Name]``, ``<insert
    date>``) unless the text is a form for the reader to fill in: a reply that drafts a letter or a
    template rightly leaves a slot on a line of its own (a signature under "Best regards,") or after a
    label ("Date: [insert date]"), and then its fill-ins are all the reader's.

    >>> placeholders("I am {{name}}, made by {{ author }}. Ask {{name}}.")
    ['{{name}}', '{{ author }}']
    >>> placeholders("I am [Your Name], an assistant. In Jinja: `{{ name }}`, {{ x | upper }}. See [1].")
    ['[Your Name]']
    >>> placeholders("Dear team,\\nthe meeting is moved.\\nBest regards,\\n[Your Name]")
    []
    """
    text = _CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)  # blanked, positions kept
    found = [m for m in MUSTACHE.finditer(text)
             if not _TEX_BEFORE.search(text, max(0, m.start() - 40), m.start())]
    fill_ins = [m for m in FILL_IN.finditer(text) if len(m.group()[1:-1].split()) <= FILL_IN_WORDS]
    if "\n" not in text.strip() or not any(_is_slot(text, m.start(), m.end()) for m in fill_ins):
        found += fill_ins
    return list(dict.fromkeys(m.group() for m in sorted(found, key=lambda m: m.start())))


def _is_slot(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` ends its line and follows nothing but a bullet or a label."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    after = text[end : len(text) if line_end < 0 else line_end]
    return not after.strip(" \t*_") and _SLOT_PREFIX.fullmatch(text[line_start:start]) is not None


def placeholder_reason(conv: Conversation) -> str | None:
    """The unfilled placeholders of the first trained reply that has any (its content, then its
    reasoning; tool-call arguments are not read), or None.

    >>> c = Conversation([Message("user", "Who are you?"), Message("assistant", "I am {{name}}, by {{author}}.")])
    >>> print(placeholder_reason(c))
    messages[1] (assistant) has the unfilled placeholder "{{name}}" (and 1 more: "{{author}}")
    >>> placeholder_reason(Conversation([Message("user", "Say {{name}}"), Message("assistant", "Hi.")])) is None
    True
    """
    for i, m in trained_replies(conv):
        for field, text in (("", m.content), (" reasoning", m.reasoning or "")):
            found = placeholders(text)
            if not found:
                continue
            why = f'messages[{i}] (assistant){field} has the unfilled placeholder "{found[0]}"'
            more = found[1:]
            if more:
                shown = ", ".join(f'"{p}"' for p in more[:3]) + (", ..." if len(more) > 3 else "")
                why += f" (and {len(more)} more: {shown})"
            return why
    return None
