"""The data types every stage shares: row -> Conversation -> Example.

Labels follow one convention everywhere: ``IGNORE = -100`` where a token is not trained, and
labels are aligned with ``input_ids`` (not shifted; only the loss shifts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IGNORE = -100

Role = Literal["system", "user", "assistant", "tool"]


@dataclass
class Message:
    role: Role
    content: str
    # None: trained or not according to data.train_on; False: never trained (per-message opt-out)
    train: bool | None = None
    # OpenAI-style tool calls of an assistant message: [{"type": "function", "id"?, "function":
    # {"name", "arguments": {...}}}], passed to the chat template unchanged
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None  # tool name of a tool message, when the source gives one
    tool_call_id: str | None = None  # the call a tool message answers, when the source gives one
    # the assistant's reasoning (OpenAI/Qwen ``reasoning_content``; ``<think>`` text is moved here)
    reasoning: str | None = None
    # the content exactly as the row wrote it when ``<think>`` text was moved to ``reasoning``: a
    # template with no reasoning convention is given this, so the reply is trained as written
    written: str | None = None

    def to_template(self, reasoning: bool = True) -> dict[str, Any]:
        """The dict handed to a Jinja chat template (``reasoning_content`` only if ``reasoning``)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None and reasoning:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.name:
            out["name"] = self.name
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # file the row came from
    line: int = 0  # 1-based line (JSONL, CSV) or record number (JSON array, Parquet)
    tools: list[dict[str, Any]] | None = None
    is_text: bool = False  # `text` format: a plain document, every token trained, EOS appended
    metric: str | None = None  # eval metric override for this row's source
    category: str | None = None  # "harmful" | "benign": the row's (or its source's) safety category
    constraints: list[dict[str, Any]] | None = None  # eval: verifiable format checks (sft.evaluation.constraints)

    def location(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class Example:
    """One tokenized conversation, before packing."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    line: int = 0
    truncated: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)
