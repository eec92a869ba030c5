"""`sft bench`: the JSON figures are present and sane, and the timed steps are train()'s steps.

No timing assertions: the machine is shared and slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_cfg as shared_cfg
from sft.cli import main
from sft.training.loop import train
from sft.training.throughput import KEYS, bench


def make_cfg(tiny_dir: Path, data_file: Path, out: Path, *extra: str):
    return shared_cfg(tiny_dir, data_file, out, "--train.batch_size=2", *extra)


def test_bench_keys_and_sane_values(tiny_dir, data_file, tmp_path):
    r = bench(make_cfg(tiny_dir, data_file, tmp_path / "run"), steps=2)
    assert set(KEYS) <= set(r)
    assert r["steps"] == 2 and len(r["losses"]) == 2 and len(r["step_seconds"]) == 2
    assert all(0.0 < x < 20.0 for x in r["losses"])  # ln(49152) = 10.8 for a random model
    assert r["tokens_per_s"] > 0 and r["tokens"] > 0
    assert r["peak_flops"] > 0 and 0.0 < r["mfu"] < 1.0
    assert 0.5 < r["padding_efficiency"] <= 1.0  # packing: rows are bins of up to max_length tokens
    assert 0.05 < r["peak_rss_gb"] < 64
    assert r["time_to_first_step_s"] > 0
    assert r["precision"] == "fp32"
    assert 0 < r["flops_per_token"] < 6 * r["params"]  # the head only runs at trained tokens
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch_version"] == torch.__version__
    assert not (tmp_path / "run").exists()  # bench writes no run directory


def test_bench_padding_efficiency_below_one_without_packing(tiny_dir, data_file, tmp_path):
    r = bench(make_cfg(tiny_dir, data_file, tmp_path / "run", "--data.packing=false"), steps=1)
    assert 0.3 < r["padding_efficiency"] < 1.0  # rows differ in length, so padded batches hold padding


def test_bench_steps_are_train_steps(tiny_dir, data_file, tmp_path):
    """The timed steps give train()'s losses for steps 2..N+1 (step 1 is the warm-up)."""
    extra = ("--train.warmup=1", "--train.schedule=cosine")
    r = bench(make_cfg(tiny_dir, data_file, tmp_path / "b", *extra), steps=2)
    t = train(make_cfg(tiny_dir, data_file, tmp_path / "t", *extra, "--train.max_steps=3"), progress=False)
    torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(t.losses[1:]), rtol=1e-5, atol=1e-6)
    # control: a bench whose schedule differs (another lr) is detected by the same comparison
    other = bench(make_cfg(tiny_dir, data_file, tmp_path / "c", *extra, "--train.lr=1e-2"), steps=2)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(t.losses[1:]), rtol=1e-5, atol=1e-6)


def test_cli_bench_json(tiny_dir, data_file, tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        f"model: {tiny_dir}\noutput_dir: {tmp_path / 'run'}\n"
        f"data:\n  train: {data_file}\n  max_length: 128\n  cache_dir: {tmp_path / 'cache'}\n"
        "train:\n  precision: fp32\n  batch_size: 2\n"
    )
    assert main(["bench", str(cfg), "--steps", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(KEYS) <= set(out) and out["steps"] == 1


def test_cli_bench_rejects_zero_steps(tiny_dir, data_file, tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(f"model: {tiny_dir}\ndata:\n  train: {data_file}\n")
    assert main(["bench", str(cfg), "--steps", "0"]) == 1
    assert "--steps" in capsys.readouterr().err


def test_bench_profile_shares_add_up_to_the_timed_steps(tiny_dir, data_file, tmp_path):
    from sft.training.profile import SHARES
    from sft.training.throughput import format_report

    r = bench(make_cfg(tiny_dir, data_file, tmp_path / "run"), steps=2, profile=True)
    assert list(r["profile"]) == list(SHARES)
    assert abs(sum(r["profile"].values()) - sum(r["step_seconds"])) < 0.01  # rounding of step_seconds only
    assert r["profile"]["matmul"] > 0 and r["profile"]["optimizer"] > 0 and r["profile"]["loss"] > 0
    assert r["compile"] is False and r["compile_s"] >= 0 and r["warmup_step_s"] > 0  # fp32 CPU: auto is off
    assert "where a timed step goes" in format_report(r)
    # control: without --profile there is no table
    plain = bench(make_cfg(tiny_dir, data_file, tmp_path / "run2"), steps=1)
    assert plain["profile"] is None and "where a timed step goes" not in format_report(plain)
