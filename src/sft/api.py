"""The Python API: what ``from sft import ...`` gives a notebook or a script.

Each function is the command of the same name without the command line: ``train`` is
``sft train``, ``evaluate`` is ``sft eval`` (returning the result instead of writing it), and
``build_dataset`` is the data pipeline as ``sft data check`` sees it. A config is a ``Config``
(``load_config(path, overrides)``) or the path of a YAML file.

    >>> import sft
    >>> sorted(sft.__all__)[:4]
    ['Config', 'Dataset', 'EvalResult', 'NonFiniteLoss']
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.config import Config, load_config

if TYPE_CHECKING:
    from sft.data.report import Dataset
    from sft.evaluation.result import EvalResult


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` did, read back from the run directory it wrote."""

    output_dir: Path
    final_dir: Path | None  # output_dir/final (the tuned model, loadable with transformers); None if it stopped early
    steps: int  # optimizer steps of the plan
    last_step: int  # the last step taken by this call
    losses: list[float]  # this call's per-step training losses
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the rows of output_dir/metrics.jsonl
    before: EvalResult | None = None  # eval.before_after: the starting model's evaluation
    after: EvalResult | None = None  # ... and the tuned model's
    stop_reason: str | None = None  # why a stop check ended the run early
    interrupted: bool = False  # stopped by a signal; continue with train(cfg, resume=True)


def _config(cfg: Config | str | os.PathLike[str]) -> Config:
    return cfg if isinstance(cfg, Config) else load_config(os.fspath(cfg), [])


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def train(cfg: Config | str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """``sft train``: fine-tune ``cfg.model`` on ``cfg.data`` into ``cfg.output_dir``.

    ``resume`` continues from the newest checkpoint; ``overwrite`` replaces an existing run
    (kept aside until the new one has saved). Raises ``SftError`` for bad input (the message
    says where and how to fix) and ``NonFiniteLoss`` when a step diverges under
    ``train.on_nan: stop``.
    """
    from sft.training.loop import train as train_run

    c = _config(cfg)
    r = train_run(c, resume=resume, overwrite=overwrite, progress=progress)
    out = Path(r.output_dir)
    metrics_file = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics_file.read_text(encoding="utf-8").splitlines() if x.strip()] \
        if metrics_file.is_file() else []
    final = out / "final"
    return TrainResult(out, final if (out / "run_state.json").is_file() and final.is_dir() else None, r.steps,
                       r.last_step, list(r.losses), rows, _read_json(out / "before.json"),
                       _read_json(out / "after.json"), r.stop_reason, r.interrupted)


def evaluate(cfg: Config | str | os.PathLike[str], model: str | os.PathLike[str] | None = None, *,
             progress: bool = True) -> EvalResult:
    """``sft eval``: the evaluation of ``model`` (a run's ``final/``, an alias or a hub ID; default
    ``cfg.model``) on ``cfg``'s eval data: held-out loss, task accuracy, stop rate, forgetting..."""
    from sft.evaluation.evaluate import evaluate_model

    return evaluate_model(_config(cfg), os.fspath(model) if model is not None else None, progress=progress)


def build_dataset(cfg: Config | str | os.PathLike[str], split: str = "train") -> Dataset:
    """The tokenized examples of ``split`` ("train", "eval" or "dev") with ``cfg.model``'s
    tokenizer: ``.examples`` (``input_ids`` and ``labels``), ``.report`` (counts, lengths,
    problems) and ``.template``; cached like ``sft train``'s."""
    from sft.data.pipeline import build_dataset as build
    from sft.models.load import load_tokenizer

    c = _config(cfg)
    tokenizer = load_tokenizer(c.model, c.trust_remote_code, revision=c.revision)
    return build(c, tokenizer, split)
