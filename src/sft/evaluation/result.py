"""The shapes that cross module seams in evaluation: what ``evaluate()`` returns and ``sft eval``,
``before.json`` and ``after.json`` hold. Readers of these files (reporting, sweep) only use
``.get`` on them, so they stay plain JSON; these types let mypy check the producer."""

from __future__ import annotations

from typing import Any, TypedDict


class Forgetting(TypedDict, total=False):
    reference_perplexity: float | None  # exp(mean NLL) of the model on the reference text
    reference_tokens: int  # tokens scored
    reference: str  # the text's version: "stdlib-prose-v1" (shipped) or "file:<name>" (eval.reference)
    reference_sha256: str  # of the reference text's UTF-8 bytes
    kl_to_base: float | None  # mean KL(base || model) per token; only with a base model
    window_nll: list[float]  # per scored window: NLL sum (the intervals and paired tests resample windows)
    window_tokens: list[int]  # ... and its scored tokens
    window_kl: list[float]  # ... and its KL sum (only with a base model)


class Rows(TypedDict, total=False):
    """Per generation row, in order: what ``sft compare`` pairs between two results. Booleans are
    strings of "1"/"0" (one character a row; "-": not applicable) to keep eval.json small."""

    key: list[str]  # "<file name>:<line>" of the row
    correct: str
    stopped: str
    category: str  # "h" harmful, "b" benign, "-" neither
    refused: str  # "1"/"0" for rows with a category, "-" otherwise
    tokens: list[int]  # reply length in tokens
    constraint_rows_met: str  # eval.metric constraints: "1" all of the row's constraints met, "-" none given
    constraints_met: list[int]  # ... and how many of its constraints were met
    constraints_total: list[int]  # ... of how many
    tool_call_accuracy: str  # eval.metric tool_call: "1" right function and arguments, "-" rows of other metrics
    tool_name_accuracy: str  # ... "1" right function names
    tool_call_unparseable: str  # ... "1" the reply opened a call that could not be read


class Losses(TypedDict):
    """Per held-out example, in order: its key, CE sum and trained tokens (eval_loss = sum / sum)."""

    key: list[str]
    nll: list[float]
    tokens: list[int]


class Sample(TypedDict):
    prompt: str
    reference: str
    reply: str
    correct: bool
    stopped: bool  # ended with the end-of-turn token (as counted by stop_rate)


class EvalResult(TypedDict, total=False):
    eval_loss: float | None
    perplexity: float | None
    eval_tokens: int
    task_accuracy: float | None
    stop_rate: float | None  # share of replies that ended with ``stop_token`` before max_new_tokens
    stop_token: str | None  # the template's end-of-turn marker that stop_rate counts
    mean_response_tokens: float | None
    mean_reasoning_tokens: float | None  # reasoning models: mean tokens of the reasoning before the answer
    accuracy_by_source: dict[str, float]
    forgetting: Forgetting
    samples: list[Sample]
    n_examples: int
    metric: str
    split: str  # "eval" (the test rows) or "dev" (the rows choices are made on)
    precision: str  # "bf16" or "fp32": the run's precision, every forward pass ran under it
    elapsed_s: float
    model: str  # set by `sft eval`
    refusal_rate: float | None  # sft.evaluation.safety: eval rows tagged "category": "harmful"
    over_refusal_rate: float | None  # ... and "category": "benign"
    constraint_rows_met: float | None  # share of rows with a `constraints` list that meet all of it
    constraint_share_met: float | None  # share of all those constraints that are met
    constraints_by_type: dict[str, float]  # share met per constraint type
    intervals: dict[str, Any]  # 95% intervals [lo, hi], shaped like the result (sft.evaluation.intervals)
    n: dict[str, Any]  # the count behind each figure (rows, examples or windows), same shape
    rows: Rows
    losses: Losses
    tool_call_accuracy: float | None  # sft.evaluation.tool_calls: rows scored with eval.metric tool_call
    tool_name_accuracy: float | None
    tool_call_unparseable: float | None
    tool_calls_expected: int  # rows of those whose reference turn has a call (the others expect none)
