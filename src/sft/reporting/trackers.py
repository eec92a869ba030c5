"""``train.report_to``: the experiment trackers people already use, behind one option.

Each tracker gets the same things: every step's metrics (``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/tokens``, ``eval/loss`` or ``dev/loss``), the resolved config, the data report
(its numbers, ``data/...``) and the final before/after figures (``before/...``, ``after/...``).
Only the writing process (rank 0) opens them. Where each one writes is its own setting, as its
users expect: ``WANDB_MODE`` / ``WANDB_DIR`` / ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI`` /
``MLFLOW_EXPERIMENT_NAME``, ``TRACKIO_DIR`` / ``TRACKIO_PROJECT``; TensorBoard event files go to
``output_dir/tensorboard``. The project name defaults to ``sft`` and the run name to the output
directory's name.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from sft.errors import SftError

EXTRA = "pip install 'sft[trackers]'"
# the module each tracker imports, and the package that provides it
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
}


def check_installed(names: Sequence[str]) -> None:
    """One error naming every tracker of ``train.report_to`` whose package is missing (called before
    the data and the model load, so a missing package costs nothing).

    >>> check_installed([])
    """
    missing = [f"{n} (package {PACKAGES[n][1]})" for n in names if importlib.util.find_spec(PACKAGES[n][0]) is None]
    if missing:
        raise SftError(f"train.report_to: {', '.join(missing)} not installed; install the trackers with "
                       f"`{EXTRA}`, or remove {'it' if len(missing) == 1 else 'them'} from train.report_to")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys.

    >>> flatten({"train": {"lr": 0.1, "seed": 1}, "model": "x"})
    {'train.lr': 0.1, 'train.seed': 1, 'model': 'x'}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def numbers(d: dict[str, Any] | None, prefix: str) -> dict[str, float]:
    """The finite numbers of a nested report (no booleans, no lists), keyed ``prefix/dotted.key``.

    >>> numbers({"eval_loss": 1.5, "forgetting": {"kl_to_base": 0.2}, "metric": "exact", "ok": True}, "after")
    {'after/eval_loss': 1.5, 'after/forgetting.kl_to_base': 0.2}
    """
    flat = flatten(d or {})
    return {f"{prefix}/{k}": float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}


def step_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` row as tracker metrics.

    >>> step_metrics({"step": 2, "loss": 1.5, "lr": 1e-05, "grad_norm": 0.5, "tokens": 300, "elapsed_s": 1.0})
    {'train/loss': 1.5, 'train/lr': 1e-05, 'train/grad_norm': 0.5, 'train/tokens': 300.0}
    >>> step_metrics({"step": 2, "eval_loss": 1.25}), step_metrics({"step": 2, "dev_loss": 1.5})
    ({'eval/loss': 1.25}, {'dev/loss': 1.5})
    """
    out = {f"train/{k}": float(row[k]) for k in ("loss", "lr", "grad_norm", "tokens") if k in row}
    for key, name in (("eval_loss", "eval/loss"), ("dev_loss", "dev/loss")):  # dev_loss: eval.dev / eval.dev_split
        if key in row:
            out[name] = float(row[key])
    return out


class Sink(Protocol):
    """One tracker: what ``Trackers`` calls on each."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def summary(self, values: dict[str, float], text: dict[str, str]) -> None: ...
    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```")
        self.last = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.last = step

    def summary(self, values: dict[str, float], text: dict[str, str]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, self.last)
        for k, t in text.items():
            self.writer.add_text(k, "```\n" + t + "\n```")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, name: str, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sft"), name=name, config=config,
                              dir=os.environ.get("WANDB_DIR"), reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, float], text: dict[str, str]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v
        self.run.config.update({k: json.loads(t) for k, t in text.items()}, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    def __init__(self, name: str, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "sft"))
        self.run = mlflow.start_run(run_name=name)
        # params are strings of at most 6,000 characters; the whole config is also an artifact
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})
        mlflow.log_dict(config, "config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def summary(self, values: dict[str, float], text: dict[str, str]) -> None:
        if values:
            self.mlflow.log_metrics(values)
        for k, t in text.items():
            self.mlflow.log_text(t, f"{k}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TrackioSink:
    def __init__(self, name: str, config: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "sft"), name=name, config=config,
                                auto_log_gpu=False)
        self.last = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)
        self.last = step

    def summary(self, values: dict[str, float], text: dict[str, str]) -> None:
        if values:  # trackio has no summary: the figures are one more row at the last step
            self.trackio.log(values, step=self.last)

    def close(self) -> None:
        self.trackio.finish()


class Trackers:
    """The open trackers of one run; every call goes to each of them."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log_row(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row (a step, or an eval loss)."""
        metrics = step_metrics(row)
        for s in self.sinks:
            s.log(metrics, int(row["step"]))

    def data_report(self, report: dict[str, Any]) -> None:
        values = numbers({k: v for k, v in report.items() if k != "sources"}, "data")
        for s in self.sinks:
            s.summary(values, {"data_report": json.dumps(report, default=str)})

    def before_after(self, before: Any, after: Any) -> None:
        values = {**numbers(before, "before"), **numbers(after, "after")}
        for s in self.sinks:
            s.summary(values, {})

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self.sinks = []


def open_trackers(names: Sequence[str], out: Path, config: dict[str, Any],
                  data_report: dict[str, Any] | None = None) -> Trackers | None:
    """Open each tracker of ``train.report_to`` (rank 0 only) and give it the resolved config and
    the data report; None when there are none."""
    if not names:
        return None
    check_installed(names)
    sinks: list[Sink] = []
    for n in names:
        if n == "tensorboard":
            sinks.append(TensorBoardSink(out, config))
        elif n == "wandb":
            sinks.append(WandbSink(out.name, config))
        elif n == "mlflow":
            sinks.append(MlflowSink(out.name, config))
        elif n == "trackio":
            sinks.append(TrackioSink(out.name, config))
        else:  # config validation allows only the four names
            raise SftError(f"train.report_to: unknown tracker {n!r}")
    trackers = Trackers(sinks)
    if data_report is not None:
        trackers.data_report(data_report)
    return trackers
