"""`sft train`, `sft bench` and `sft lr-find` share one setup (``sft.training.prepare.prepare``):
changing a setup option (precision, threads, seed) changes what each of them steps with.

The first optimizer step of each command is intercepted (``forward_backward``, which every step
calls) and what it sees is recorded: the dtype the weights were loaded in and train in, the
runtime's precision, torch's thread count and seed, Python's random state. Then the step is
stopped: nothing is computed. Before each command the process state is scrambled (other thread
count and seeds), so a command that skips a setting shows the scrambled value.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from sft.config import load_config


class Stop(Exception):
    pass


def first_step_of_each_command(tiny_dir: Path, data_file: Path, root: Path, monkeypatch: pytest.MonkeyPatch,
                               *options: str) -> dict[str, tuple[Any, ...]]:
    import sft.models.load as load_mod
    import sft.training.step as step_mod
    from sft.training.loop import train
    from sft.training.throughput import bench
    from sft.tuning.lr_find import run_lr_find

    seen: dict[str, tuple[Any, ...]] = {}
    command = {"name": "", "loaded": None}
    real_load = load_mod.load_model

    def load_spy(name: str, dtype: Any = None, *a: Any, **k: Any) -> Any:
        command["loaded"] = dtype
        return real_load(name, dtype, *a, **k)

    def spy(model: Any, batches: Any, n_trained: int, rt: Any, weights: Any = None) -> float:
        dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
        seen[command["name"]] = (command["loaded"], dtype, rt.precision, torch.get_num_threads(),
                                 torch.initial_seed(), hash(random.getstate()))
        raise Stop

    monkeypatch.setattr(step_mod, "forward_backward", spy)
    monkeypatch.setattr(load_mod, "load_model", load_spy)

    def cfg(name: str) -> Any:
        return load_config(None, [f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={root / name}",
                                  "--data.max_length=128", "--train.batch_size=2", "--train.max_steps=2",
                                  f"--data.cache_dir={root / 'cache'}", *options])

    for name, run in (("train", lambda: train(cfg("train"), progress=False)),
                      ("bench", lambda: bench(cfg("bench"), steps=1)),
                      ("lr-find", lambda: run_lr_find(cfg("lr-find"), steps=2))):
        command["name"] = name
        torch.set_num_threads(3)  # scrambled: each command must set its own
        torch.manual_seed(999)
        random.seed(999)
        with pytest.raises(Stop):
            run()
    return seen


def test_train_bench_and_lr_find_follow_one_setup_option(tiny_dir: Path, data_file: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    try:
        a = first_step_of_each_command(tiny_dir, data_file, tmp_path / "a", monkeypatch,
                                       "--train.precision=fp32", "--train.threads=1", "--train.seed=5")
        b = first_step_of_each_command(tiny_dir, data_file, tmp_path / "b", monkeypatch,
                                       "--train.precision=bf16", "--train.threads=2", "--train.seed=7")
    finally:
        torch.set_num_threads(threads)
    assert set(a) == set(b) == {"train", "bench", "lr-find"}
    assert {v[:5] for v in a.values()} == {(torch.float32, torch.float32, "fp32", 1, 5)}
    assert {v[:5] for v in b.values()} == {(torch.bfloat16, torch.bfloat16, "bf16", 2, 7)}
    # Python's generator is seeded the same way by all three, and the seed changes it
    assert len({v[5] for v in a.values()}) == 1 and len({v[5] for v in b.values()}) == 1
    assert a["train"][5] != b["train"][5]
