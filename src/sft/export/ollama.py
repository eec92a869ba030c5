"""The Ollama ``Modelfile``: the training template in Ollama's Go-template syntax, its stops, its system prompt.

Ollama does not run Jinja, so the template is translated, and only where the translation is known
to render the same text: the training template is recognised by *rendering* probe conversations
with it and with sft's built-ins (chatml, gemma, llama3), so a vendor template that renders like
one of them (SmolLM2's own ChatML with its default system prompt, say) is translated too. Anything
else is refused with a way out. What the Go templates do not do: tools and tool calls, and the
``| trim`` of message contents in the gemma and llama3 templates. The BOS token is not written in
the template: llama.cpp (and so Ollama) adds it as the GGUF's ``add_bos_token`` says.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sft.errors import SftError

# Go templates over Ollama's .Messages (each with .Role and .Content); Ollama puts the Modelfile's
# SYSTEM in front as a system message when a request has none.
GO_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    # Gemma folds the system prompt into the first user turn; the assistant is "model".
    "gemma": (
        '{{- $system := "" }}\n'
        '{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}\n'
        "{{- $first := true }}\n"
        "{{- range .Messages }}\n"
        '{{- if eq .Role "assistant" }}<start_of_turn>model\n'
        "{{ .Content }}<end_of_turn>\n"
        '{{ else if ne .Role "system" }}<start_of_turn>user\n'
        "{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
        "{{ end }}\n"
        '{{- if ne .Role "system" }}{{ $first = false }}{{ end }}\n'
        "{{- end }}<start_of_turn>model\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>"
        '{{ if eq .Role "tool" }}ipython{{ else }}{{ .Role }}{{ end }}<|end_header_id|>\n\n'
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}

# Probe conversations: with and without a system prompt, one and two user turns. Contents have no
# outer whitespace, so templates that trim contents render them as those that do not.
_SYS = {"role": "system", "content": "You answer in one word."}
_PROBES = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
]
_MARK = "\ue000SYSTEM\ue001"


@dataclass(frozen=True)
class Family:
    name: str  # chatml | gemma | llama3
    default_system: str | None  # the system prompt the template adds when a conversation has none


def _render(tokenizer: Any, source: str, messages: list[dict[str, str]]) -> str | None:
    try:
        return str(tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                 add_generation_prompt=True))
    except Exception:  # the template rejects the probe: it is not this family
        return None


def identify(template: str, tokenizer: Any) -> Family | None:
    """The built-in family ``template`` renders like, with its default system prompt if it adds one.

    >>> identify("{% for m in messages %}{{ m['content'] }}{% endfor %}", None) is None
    True
    """
    if tokenizer is None:
        return None
    from sft.data.chat import resolve_template

    for name in GO_TEMPLATES:
        ref = resolve_template(name, tokenizer)
        with_system = [(_render(tokenizer, template, [_SYS, *p]), _render(tokenizer, ref, [_SYS, *p])) for p in _PROBES]
        if all(want is not None and got == want for got, want in with_system):
            if all(_render(tokenizer, template, p) == _render(tokenizer, ref, p) for p in _PROBES):
                return Family(name, None)
            default = _default_system(tokenizer, template, ref)
            if default is not None:
                return Family(name, default)
    return None


def _default_system(tokenizer: Any, template: str, ref: str) -> str | None:
    """The system prompt S such that ``template`` renders a conversation without one as ``ref``
    renders it with S in front (SmolLM2: "You are a helpful AI assistant named SmolLM, ...")."""
    got = _render(tokenizer, template, _PROBES[0])
    pattern = _render(tokenizer, ref, [{"role": "system", "content": _MARK}, *_PROBES[0]])
    if got is None or pattern is None or pattern.count(_MARK) != 1:
        return None
    before, after = pattern.split(_MARK)
    m = re.fullmatch(re.escape(before) + "(.+?)" + re.escape(after), got, flags=re.S)
    if m is None:
        return None
    system = {"role": "system", "content": m.group(1)}
    same = all(_render(tokenizer, template, p) == _render(tokenizer, ref, [system, *p]) for p in _PROBES)
    return m.group(1) if same else None


def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise SftError(f"--to ollama: the {what} contains three double quotes, which a Modelfile cannot hold; remove them")
    return f'"""{text}"""'


def modelfile(gguf_name: str, template: str, tokenizer: Any, stop_tokens: list[str],
              system: str | None = None) -> tuple[str, Family]:
    """The Modelfile text for a GGUF next to it, and the template family it was translated from.

    ``system`` is the data's default system prompt (``data.system``); without one, the template's
    own default (if any) becomes the Modelfile's SYSTEM.
    """
    family = identify(template, tokenizer)
    if family is None:
        raise SftError(
            "--to ollama: the training template renders like none of the templates sft translates to "
            f"Ollama's syntax ({', '.join(GO_TEMPLATES)}, or a vendor template that renders like one, e.g. "
            "SmolLM2's); export --to gguf and write the Modelfile's TEMPLATE yourself, or train with "
            "data.template: chatml, gemma or llama3"
        )
    lines = [
        f"# Written by `sft export --to ollama`; the training template rendered like sft's {family.name!r}",
        "# template and was translated; not translated: tools/tool calls, trimming of message contents.",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quote(GO_TEMPLATES[family.name], 'template')}",
    ]
    prompt = system if system is not None else family.default_system
    if prompt:
        lines.append(f"SYSTEM {_quote(prompt, 'system prompt')}")
    for tok in dict.fromkeys(stop_tokens):
        escaped = tok.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(lines) + "\n", family
