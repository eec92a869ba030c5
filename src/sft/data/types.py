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
    # OpenAI-style tool calls of an assistant message, passed to the chat template unchanged
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None  # tool name of a tool message, when the source gives one

    def to_template(self) -> dict[str, Any]:
        """The dict handed to a Jinja chat template."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class Conversation:
    messages: list[Message]
    source: str = ""  # file the row came from
    line: int = 0  # 1-based line (JSONL, CSV) or record number (JSON array, Parquet)
    tools: list[dict[str, Any]] | None = None
    is_text: bool = False  # `text` format: a plain document, every token trained, EOS appended
    metric: str | None = None  # eval metric override for this row's source

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
