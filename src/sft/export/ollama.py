"""The Ollama ``Modelfile``: the training template in Ollama's Go-template syntax, its stops, its system prompt.

Ollama does not run Jinja, so the template is translated, and only where the translation is known
to render the same text: the training template is recognised by *rendering* probe conversations
with it and with sft's built-ins (chatml, gemma, llama3), so a vendor template that renders like
one of them (SmolLM2's own ChatML with its default system prompt, say) is translated too. Anything
else is refused with a way out. Tools, tool calls and tool results are translated for chatml
(Hermes/Qwen's ``<tool_call>``) and llama3 (Llama 3.1's JSON) when the training template renders a
tool conversation as sft's own does (``GO_TOOL_TEMPLATES``), not for gemma. What the Go templates
do not do: the ``| trim`` of message contents in the gemma and llama3 templates. The BOS token is not written in
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

# The same, with Ollama's tool values (.Tools, each message's .ToolCalls with .Function.Name and
# .Function.Arguments, "tool" messages), for the families whose sft template writes tool calls in
# a format Ollama's clients expect: Hermes/Qwen in chatml, Llama 3.1's JSON in llama3. Without
# tools they render as GO_TEMPLATES. Ollama prints .Function.Arguments and a tool as JSON (Go's
# encoder: compact, keys sorted), so those JSON texts differ in spacing and key order from the
# Jinja rendering (`tojson`), not in value. Ollama reads the model's calls by rendering a call
# with this template and matching what comes before its JSON (<tool_call> here, nothing for Llama).
_CHATML_TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{{ range .Tools }}\n{{ . }}{{ end }}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)
_LLAMA3_TOOLS_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    'value}.Do not use variables.\n\n'
    "{{ range $.Tools }}{{ . }}\n\n{{ end }}"
)
# the first message's content when it is a system message (what the Jinja templates fold in)
_FIRST_SYSTEM = '{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (eq $m.Role "system") }}{{ $m.Content }}'
GO_TOOL_TEMPLATES = {
    # with tools: the system prompt and the tool list in one system turn; consecutive tool results
    # in one user turn of <tool_response> blocks; each call after the content as <tool_call>.
    "chatml": (
        "{{- if .Tools }}<|im_start|>system\n" + _FIRST_SYSTEM + "\n\n{{ end }}{{ end }}"
        + _CHATML_TOOLS_SYSTEM + "{{ end }}"
        '{{- $prev := "" }}'
        "{{- range $i, $m := .Messages }}"
        '{{- if and $.Tools (eq $i 0) (eq .Role "system") }}{{ continue }}{{ end }}'
        '{{- if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}'
        "\n<tool_response>\n{{ .Content }}\n</tool_response>"
        '{{- else }}{{ if eq $prev "tool" }}<|im_end|>\n{{ end }}<|im_start|>{{ .Role }}\n{{ .Content }}'
        "{{- range $j, $c := .ToolCalls }}{{ if or $m.Content $j }}\n{{ end }}<tool_call>\n"
        '{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}\n</tool_call>{{ end }}'
        "<|im_end|>\n{{ end }}"
        "{{- $prev = .Role }}"
        '{{- end }}{{ if eq $prev "tool" }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
    ),
    # with tools: "Environment: ipython" and the system prompt in a system turn, the tool list in
    # the first user turn, a call as the whole assistant turn, results as ipython turns.
    "llama3": (
        "{{- if .Tools }}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n"
        + _FIRST_SYSTEM + "{{ end }}{{ end }}<|eot_id|>{{ end }}"
        "{{- $first := true }}"
        "{{- range $i, $m := .Messages }}"
        '{{- if and $.Tools (eq $i 0) (eq .Role "system") }}{{ continue }}{{ end }}'
        '<|start_header_id|>{{ if eq .Role "tool" }}ipython{{ else }}{{ .Role }}{{ end }}<|end_header_id|>\n\n'
        '{{ if and $.Tools $first (eq .Role "user") }}' + _LLAMA3_TOOLS_USER + "{{ end }}"
        "{{- if .ToolCalls }}{{ range .ToolCalls }}"
        '{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}'
        "{{- else }}{{ .Content }}{{ end }}<|eot_id|>"
        "{{- $first = false }}"
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
# A tool conversation: tools, a system prompt, a call, its result, an answer, a next question.
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]
_TOOL_PROBE: list[dict[str, Any]] = [
    _SYS, {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"sky": "clear"}'},
    {"role": "assistant", "content": "Clear."}, {"role": "user", "content": "And Lima?"},
]


@dataclass(frozen=True)
class Family:
    name: str  # chatml | gemma | llama3
    default_system: str | None  # the system prompt the template adds when a conversation has none
    tools: bool = False  # writes tools, calls and results as sft's template does (GO_TOOL_TEMPLATES)


def _render(tokenizer: Any, source: str, messages: list[dict[str, Any]], tools: Any = None) -> str | None:
    try:
        return str(tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False,
                                                 add_generation_prompt=True, tools=tools))
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
            want = _render(tokenizer, ref, _TOOL_PROBE, _TOOLS)
            tools = name in GO_TOOL_TEMPLATES and want is not None and _render(tokenizer, template, _TOOL_PROBE, _TOOLS) == want
            if all(_render(tokenizer, template, p) == _render(tokenizer, ref, p) for p in _PROBES):
                return Family(name, None, tools)
            default = _default_system(tokenizer, template, ref)
            if default is not None:
                return Family(name, default, tools)
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
    go = GO_TOOL_TEMPLATES[family.name] if family.tools else GO_TEMPLATES[family.name]
    tools = (", with tools, tool calls and results (their JSON written compactly by Ollama); not translated:"
             if family.tools else "; not translated: tools/tool calls,")
    lines = [
        f"# Written by `sft export --to ollama`; the training template rendered like sft's {family.name!r}",
        f"# template and was translated{tools} trimming of message contents.",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quote(go, 'template')}",
    ]
    prompt = system if system is not None else family.default_system
    if prompt:
        lines.append(f"SYSTEM {_quote(prompt, 'system prompt')}")
    for tok in dict.fromkeys(stop_tokens):
        escaped = tok.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'PARAMETER stop "{escaped}"')
    return "\n".join(lines) + "\n", family
