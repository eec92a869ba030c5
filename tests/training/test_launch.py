"""``sft train --nproc N`` (sft.launch): torchrun's own agent, whose failure report is one line, and
the checks that need no process run before any starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sft import cli


def test_a_failed_rank_is_one_line_and_its_exit_status():
    script = Path(__file__).with_name("fail_rank.py")
    r = subprocess.run([sys.executable, "-m", "sft.launch", "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "error: rank 1 found a problem" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == (
        "sft: rank 1 exited with code 3; its error is above (the other ranks were stopped)")
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr and "closing signal" not in r.stderr
    # control: plain torchrun buries the same error under its agent's traceback
    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script)], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "ChildFailedError" in plain.stderr


def test_qlora_with_nproc_fails_before_torchrun_starts(tiny_dir, data_file, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\noutput_dir: {tmp_path / 'run'}\ndata:\n  train: [{data_file}]\n"
                   "train:\n  method: qlora\n  max_steps: 1\n")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("torchrun was started"))
    assert cli.main(["train", str(cfg), "--nproc", "2"]) == 1
    assert "error: train.method: qlora runs in one process; this run has 2" in capsys.readouterr().err


@pytest.mark.parametrize(("preset", "expected"), [(None, "4"), ("3", "3")])
def test_cpu_ranks_share_the_usable_cores(monkeypatch, capfd, preset, expected):
    """8 usable cores (stubbed), 2 ranks: 4 threads each (torchrun alone gives 1); a set value wins."""
    from sft import launch

    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", preset or "unset")  # recorded, so what main() sets is undone
    if preset is None:
        monkeypatch.delenv("OMP_NUM_THREADS")
    script = Path(__file__).with_name("print_threads.py")
    assert launch.main(["--standalone", "--nproc_per_node", "2", str(script)]) == 0
    assert f"OMP_NUM_THREADS={expected}" in capfd.readouterr().out
