"""The shapes that cross module seams in evaluation: what ``evaluate()`` returns and ``sft eval``,
``before.json`` and ``after.json`` hold. Readers of these files (reporting, sweep) only use
``.get`` on them, so they stay plain JSON; these types let mypy check the producer."""

from __future__ import annotations

from typing import TypedDict


class Forgetting(TypedDict, total=False):
    reference_perplexity: float | None  # exp(mean NLL) of the model on the reference text
    reference_tokens: int  # tokens scored
    reference: str  # the text's version: "stdlib-prose-v1" (shipped) or "file:<name>" (eval.reference)
    reference_sha256: str  # of the reference text's UTF-8 bytes
    kl_to_base: float | None  # mean KL(base || model) per token; only with a base model


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
    accuracy_by_source: dict[str, float]
    forgetting: Forgetting
    samples: list[Sample]
    n_examples: int
    metric: str
    elapsed_s: float
    model: str  # set by `sft eval`
    refusal_rate: float | None  # sft.evaluation.safety: eval rows tagged "category": "harmful"
    over_refusal_rate: float | None  # ... and "category": "benign"
