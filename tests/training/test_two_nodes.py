"""Two "nodes" on one machine: the rendezvous path users take across machines.

``torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint localhost:PORT`` is
launched twice (the first hosts the rendezvous store); each launch is a node whose one process
has LOCAL_RANK 0, so both tokenize into the shared data cache at the same time (the stores are
written into temporary folders and renamed: one wins, neither reads a half). The per-step losses
equal one process's with the same global batch (2 nodes x grad_accum 2 == 1 x grad_accum 4).
Slow: two torchrun start-ups (~1 min on the 2-core machine).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.config import load_config
from sft.training.loop import train


def args(tiny_dir: Path, data_file: Path, out: Path, cache: Path, accum: int) -> list[str]:
    return [f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={out}", "--train.lr=1e-4",
            "--train.precision=fp32", "--train.warmup=0", "--train.schedule=constant", "--data.max_length=128",
            f"--data.cache_dir={cache}", "--train.batch_size=1", "--train.threads=1", "--train.max_steps=4",
            f"--train.grad_accum={accum}", "--data.num_proc=1"]


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_over_c10d_rendezvous_equal_one_process(tmp_path: Path, tiny_dir: Path, data_file: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    out = tmp_path / "two-nodes"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "sft-two-nodes",
               "--rdzv-conf", f"is_host={1 - node}", "-m", "sft", "train", str(cfg_file),
               *args(tiny_dir, data_file, out, tmp_path / "cache", 2)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(log[-3000:] for log in logs)
    assert sum("global batch 1 x 2 x 2 = 4" in log for log in logs) == 1  # said once, by global rank 0

    threads = torch.get_num_threads()
    train(load_config(None, args(tiny_dir, data_file, tmp_path / "one", tmp_path / "cache-one", 4)), progress=False)
    torch.set_num_threads(threads)
    one, two = losses(tmp_path / "one"), losses(out)
    assert len(one) == len(two) == 4
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(one, two)), (one, two)
    assert len(list((tmp_path / "cache" / "sources").iterdir())) == 1  # both nodes' stores: one entry
    # control: one process with half the global batch (what one node alone would do) differs
    train(load_config(None, args(tiny_dir, data_file, tmp_path / "half", tmp_path / "cache-one", 2)), progress=False)
    torch.set_num_threads(threads)
    half = losses(tmp_path / "half")
    assert any(abs(a - b) > 1e-4 * abs(a) for a, b in zip(half[1:], two[1:])), (half, two)
