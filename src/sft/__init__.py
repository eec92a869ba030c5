"""sft: supervised fine-tuning of causal language models.

The supported Python API (``__all__``; anything else may move between versions):

    from sft import load_config, train, evaluate, build_dataset
    cfg = load_config("run.yaml", ["--train.max_steps=50"])
    result = train(cfg)                       # TrainResult: output_dir, final_dir, losses, metrics, before, after
    scores = evaluate(cfg, result.final_dir)  # EvalResult: eval_loss, task_accuracy, stop_rate, forgetting, ...

``train``, ``evaluate`` and ``build_dataset`` load torch and transformers on first use, so
``import sft`` stays quick (the command line imports it too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sft.config import Config, load_config
from sft.errors import NonFiniteLoss, SftError

if TYPE_CHECKING:
    from sft.api import TrainResult, build_dataset, evaluate, train
    from sft.data.report import Dataset
    from sft.evaluation.result import EvalResult

__version__ = "0.1.0"
__all__ = [
    "Config", "Dataset", "EvalResult", "NonFiniteLoss", "SftError", "TrainResult", "__version__",
    "build_dataset", "evaluate", "load_config", "train",
]

_LAZY = {
    "train": "sft.api", "evaluate": "sft.api", "build_dataset": "sft.api", "TrainResult": "sft.api",
    "Dataset": "sft.data.report", "EvalResult": "sft.evaluation.result",
}


def __getattr__(name: str) -> Any:
    """The heavy names, imported when first used (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sft' has no attribute {name!r}")
