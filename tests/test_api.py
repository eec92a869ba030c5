"""The public Python API (``sft.__all__``): the curated names, a light ``import sft``, and the
example in examples/api run from a fresh interpreter the way a notebook or script uses it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import sft

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["Config", "Dataset", "EvalResult", "NonFiniteLoss", "SftError", "TrainResult", "__version__",
          "build_dataset", "evaluate", "load_config", "train"]


def test_all_is_the_curated_list_and_every_name_resolves():
    assert sorted(sft.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(sft, name) is not None, name
    from sft.api import TrainResult, build_dataset, evaluate, train

    assert (sft.train, sft.evaluate, sft.build_dataset, sft.TrainResult) == (train, evaluate, build_dataset, TrainResult)
    assert issubclass(sft.NonFiniteLoss, sft.SftError)
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        sft.trian  # noqa: B018  (control: a misspelt name is an error, not None)


def test_import_sft_loads_no_torch():
    """``import sft`` (what the CLI does first) stays light; the API module loads on first use."""
    code = ("import sys, sft\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sft.api') if m in sys.modules))\n"
            "sft.train\n"
            "print('sft.api' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "True"]


NOTEBOOK = """
import sys
from sft import load_config, train
cfg = load_config(None, [f"--model={sys.argv[1]}", f"--data.train={sys.argv[2]}", f"--output_dir={sys.argv[3]}",
                         "--train.max_steps=1", "--train.batch_size=2", "--data.max_length=128",
                         "--train.precision=fp32", "--train.threads=1"])
r = train(cfg, progress=False)
print(r.last_step, r.final_dir, len(r.losses))
"""


def test_train_from_a_fresh_interpreter_like_a_notebook(tiny_dir, data_file, tmp_path):
    out = tmp_path / "nb"
    r = subprocess.run([sys.executable, "-c", NOTEBOOK, str(tiny_dir), str(data_file), str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"1 {out / 'final'} 1"


@pytest.mark.slow
def test_the_api_example_trains_and_evaluates_from_a_fresh_interpreter(tiny_dir, tmp_path):
    """examples/api/train_and_evaluate.py end to end (data, train with before/after, evaluate)."""
    out = tmp_path / "api"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "api" / "train_and_evaluate.py"),
                        "--model", str(tiny_dir), "--steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert any(x.startswith("16 training examples, ") and x.endswith(" trained tokens") for x in lines)
    assert any(x.startswith("trained 2 steps: loss ") for x in lines)
    assert any(x.startswith("task accuracy ") for x in lines) and lines[-1] == f"model: {out / 'run' / 'final'}"
    assert (out / "run" / "final" / "model.safetensors").is_file() and (out / "run" / "after.json").is_file()


def test_train_result_reads_the_run_back(tiny_dir, data_file, tmp_path):
    cfg = sft.load_config(None, [f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={tmp_path / 'r'}",
                                 "--train.max_steps=2", "--train.batch_size=2", "--data.max_length=128",
                                 "--train.precision=fp32", f"--data.cache_dir={tmp_path / 'cache'}"])
    r = sft.train(cfg, progress=False)
    assert isinstance(r, sft.TrainResult) and r.final_dir == tmp_path / "r" / "final" and r.last_step == 2
    assert [m["step"] for m in r.metrics if "loss" in m] == [1, 2]
    assert [m["loss"] for m in r.metrics if "loss" in m] == pytest.approx(r.losses, abs=1e-6)
    assert r.before is None and r.after is None  # eval.before_after is off by default
    with pytest.raises(sft.SftError, match="output_dir"):  # control: an existing run is not silently replaced
        sft.train(cfg, progress=False)
