"""``train.report_to``: a tiny run logs to TensorBoard, W&B (offline), MLflow (a file store) and
trackio (its local SQLite store); each store is read back and must hold the run's own step losses,
config, data report and before/after figures. The packages come with the ``trackers`` extra, which
``make install`` installs, so these tests never skip."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import struct
from pathlib import Path

import pytest

from conftest import make_cfg as shared_cfg
from sft.config import load_config
from sft.errors import SftError
from sft.reporting import trackers
from sft.training.loop import train


def make_cfg(tiny_dir, data_file, out, *extra):
    return shared_cfg(tiny_dir, data_file, out, "--train.max_steps=3", "--train.batch_size=2", "--eval.split=0.25",
                      "--eval.every=2", "--eval.before_after=true", "--eval.max_new_tokens=4",
                      "--eval.reference_tokens=256", *extra)


def tracker_env(monkeypatch, root: Path) -> None:
    """Every tracker writes under ``root`` and nothing leaves the machine."""
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": root, "WANDB_CONFIG_DIR": root / "wb-cfg",
                 "WANDB_CACHE_DIR": root / "wb-cache", "WANDB_DATA_DIR": root / "wb-data",
                 "MLFLOW_TRACKING_URI": f"file:{root / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
                 "TRACKIO_DIR": root / "trackio"}.items():
        monkeypatch.setenv(k, str(v))


def wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file (LevelDB's log format: 32 KiB blocks of chunks, each with a
    7-byte header ``crc32, length, type``; type 1 a whole record, 2/3/4 its first/middle/last part)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            part = chunk
        elif kind == 3:
            part += chunk
        elif kind == 4:
            out.append(part + chunk)
        else:
            break
    return out


def read_wandb(root: Path) -> tuple[dict[int, dict], dict, dict]:
    """(history by step, config, summary) of the one offline run under ``root``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
    history: dict[int, dict] = {}
    config: dict = {}
    summary: dict = {}
    for data in wandb_records(path):
        r = pb.Record()
        r.ParseFromString(data)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return history, config, summary


def read_mlflow(root: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str], list[str]]:
    """(metric histories, params, artifact paths) of the one run in the file store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{root / 'mlruns'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "sft"]
    (run,) = client.search_runs([exp.experiment_id])
    hist = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    arts = [a.path for a in client.list_artifacts(run.info.run_id)]
    return hist, run.data.params, arts


def read_trackio(root: Path) -> tuple[list[tuple[int, dict]], dict]:
    db = sqlite3.connect(root / "trackio" / "sft.db")
    rows = [(s, json.loads(m)) for s, m in db.execute("select step, metrics from metrics order by id")]
    (config,) = [json.loads(c) for (c,) in db.execute("select config from configs")]
    return rows, config


def read_tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}


@pytest.mark.slow  # ~10-16 s: a before/after evaluation and four trackers starting
def test_report_to_writes_each_tracker_and_reads_back(tiny_dir, data_file, tmp_path, monkeypatch):
    tracker_env(monkeypatch, tmp_path)
    out = tmp_path / "run"
    train(make_cfg(tiny_dir, data_file, out, "--train.report_to=[tensorboard, wandb, mlflow, trackio]"),
          progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    after = json.loads((out / "after.json").read_text())
    before = json.loads((out / "before.json").read_text())
    assert [s for s, _ in losses] == [1, 2, 3] and [s for s, _ in evals] == [2, 3]

    tb = read_tensorboard(out)
    # TensorBoard keeps float32; metrics.jsonl rounds to 6 decimals
    assert tb["train/loss"] == [(s, pytest.approx(v, abs=1e-5)) for s, v in losses]
    assert tb["eval/loss"] == [(s, pytest.approx(v, abs=1e-5)) for s, v in evals]
    assert tb["after/eval_loss"][0][1] == pytest.approx(after["eval_loss"])
    trained = tb["data/trained_tokens"][0][1]  # the data report's count of trained tokens
    assert trained > 0

    history, config, summary = read_wandb(tmp_path)
    assert [(s, history[s]["train/loss"]) for s in (1, 2, 3)] == losses
    assert [(s, history[s]["eval/loss"]) for s in (2, 3)] == [(s, pytest.approx(v, abs=1e-6)) for s, v in evals]
    assert config["train"]["lr"] == 1e-3 and config["model"] == str(tiny_dir)
    assert config["data_report"]["trained_tokens"] == summary["data/trained_tokens"] == trained
    assert summary["before/eval_loss"] == pytest.approx(before["eval_loss"])
    assert summary["after/eval_loss"] == pytest.approx(after["eval_loss"])

    hist, params, arts = read_mlflow(tmp_path)
    assert hist["train/loss"] == [(s, pytest.approx(v)) for s, v in losses]
    assert params["train.lr"] == "0.001" and params["train.report_to"] == str(["tensorboard", "wandb", "mlflow", "trackio"])
    assert hist["after/eval_loss"][0][1] == pytest.approx(after["eval_loss"])
    assert {"config.json", "data_report.json"} <= set(arts)

    trows, tconfig = read_trackio(tmp_path)
    assert [(s, m["train/loss"]) for s, m in trows if "train/loss" in m] == losses
    assert tconfig["train"]["lr"] == 1e-3
    summaries = {k: v for _, m in trows for k, v in m.items() if k.startswith(("before/", "after/", "data/"))}
    assert summaries["after/eval_loss"] == pytest.approx(after["eval_loss"])
    assert summaries["data/trained_tokens"] == trained


def test_control_without_report_to_no_tracker_writes(tiny_dir, data_file, tmp_path, monkeypatch):
    tracker_env(monkeypatch, tmp_path)
    out = tmp_path / "run"
    train(make_cfg(tiny_dir, data_file, out, "--eval.before_after=false"), progress=False)
    assert (out / "metrics.jsonl").exists()
    assert not (out / "tensorboard").exists() and not (tmp_path / "wandb").exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "trackio").exists()


def test_missing_package_names_the_extra_before_the_data_loads(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    cfg = load_config(None, ["--model=nowhere", f"--data.train={tmp_path / 'missing.jsonl'}",
                             f"--output_dir={tmp_path / 'out'}", "--train.report_to=[tensorboard, wandb, mlflow]"])
    with pytest.raises(SftError) as e:
        train(cfg, progress=False)
    assert str(e.value) == (
        "train.report_to: wandb (package wandb), mlflow (package mlflow-skinny) not installed; install the "
        "trackers with `pip install 'sft[trackers]'`, or remove them from train.report_to")


def test_report_to_config_values():
    assert load_config(None, ["--train.report_to=wandb"]).train.report_to == ["wandb"]
    assert load_config(None, []).train.report_to == []
    with pytest.raises(SftError, match=r"train.report_to\[0\]: 'wandbb' is not allowed; did you mean 'wandb'"):
        load_config(None, ["--train.report_to=[wandbb]"])
    with pytest.raises(SftError, match=r"train.tensorboard: replaced; write train.report_to: \[tensorboard\]"):
        load_config(None, ["--train.tensorboard=true"])


def test_step_metrics_and_numbers_are_pure():
    assert trackers.step_metrics({"step": 1, "loss": 2.0, "lr": 0.1}) == {"train/loss": 2.0, "train/lr": 0.1}
    assert trackers.numbers({"a": {"b": float("nan"), "c": 1}, "d": [1]}, "x") == {"x/a.c": 1.0}
