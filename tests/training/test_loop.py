"""The training loop's invariants, each with a control that shows the check can fail.

- batch 4 x accumulation 1 == batch 1 x accumulation 4 (per-step loss and final weights);
- a run killed with SIGKILL and resumed == an uninterrupted run (per-step losses, exactly);
- packed and unpacked training give the same first-step loss;
- golden first losses of a seeded tiny run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_cfg
from sft.training.loop import train


def losses_of(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_grad_accum_equivalence(tiny_dir, data_file, tmp_path):
    a = train(make_cfg(tiny_dir, data_file, tmp_path / "a", "--train.batch_size=4", "--train.grad_accum=1",
                       "--data.packing=false", "--train.max_steps=2"), progress=False)
    b = train(make_cfg(tiny_dir, data_file, tmp_path / "b", "--train.batch_size=1", "--train.grad_accum=4",
                       "--data.packing=false", "--train.max_steps=2"), progress=False)
    assert len(a.losses) == len(b.losses) == 2
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    start = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(wa[k], start[k]) for k in wa)  # training moved the weights


def test_per_microbatch_mean_would_differ(tiny_dir, data_file, tmp_path):
    """Control: the 2024 bug (mean per micro-batch, then mean over micro-batches) gives another loss."""
    from sft.data.pipeline import build_dataset
    from sft.lm.loss import token_loss_sum
    from sft.models.load import load_model, load_tokenizer
    from sft.training.step import to_batch

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "c", "--data.packing=false")
    tok = load_tokenizer(cfg.model)
    ex = build_dataset(cfg, tok).examples[:4]
    model = load_model(cfg.model)
    sums = [token_loss_sum(model, to_batch([[e]], False, 0, torch.device("cpu"))) for e in ex]
    right = sum(float(s.detach()) for s, _ in sums) / sum(n for _, n in sums)
    wrong = sum(float(s.detach()) / n for s, n in sums) / len(sums)
    assert abs(right - wrong) > 1e-3


def test_packed_and_unpacked_first_loss_equal(tiny_dir, data_file, tmp_path):
    common = ["--train.batch_size=16", "--train.max_steps=1"]
    packed = train(make_cfg(tiny_dir, data_file, tmp_path / "p", "--data.packing=true", *common), progress=False)
    padded = train(make_cfg(tiny_dir, data_file, tmp_path / "u", "--data.packing=false", *common), progress=False)
    assert packed.losses[0] == pytest.approx(padded.losses[0], rel=1e-5)


def test_packed_loss_with_leaking_attention_differs(tiny_dir, data_file, tmp_path, monkeypatch):
    """Control: if position_ids did not restart, examples would attend to each other."""
    import sft.training.step as train_mod
    from sft.data import collate

    common = ["--train.batch_size=16", "--train.max_steps=1"]
    good = train(make_cfg(tiny_dir, data_file, tmp_path / "g", "--data.packing=true", *common), progress=False)

    def leaky(rows, pad_id, shape=None):
        b = collate.collate_packed_rows(rows, pad_id, shape)
        b["position_ids"] = torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"]).clone()
        return b

    monkeypatch.setattr(train_mod, "collate_packed_rows", leaky)
    bad = train(make_cfg(tiny_dir, data_file, tmp_path / "l", "--data.packing=true", *common), progress=False)
    assert abs(good.losses[0] - bad.losses[0]) > 1e-4


def test_golden_first_losses(tiny_dir, data_file, tmp_path):
    r = train(make_cfg(tiny_dir, data_file, tmp_path / "g", "--train.batch_size=2", "--train.max_steps=3",
                       "--data.packing=false"), progress=False)
    assert r.losses == pytest.approx(GOLDEN, rel=1e-4)


# First losses of the seeded tiny run above (fp32, CPU). ln(49152) = 10.80: a random model starts near it.
GOLDEN = [10.85319, 10.79443, 10.74002]


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sft.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_pause_and_resume_gives_identical_losses(tiny_dir, data_file, tmp_path, monkeypatch):
    """Exact resume, in process (the SIGKILL version below is slow): stopped at step 3 (a checkpoint
    is saved), then --resume: the losses of an uninterrupted run. Control: the same resume without
    the optimizer state gives other losses."""
    import shutil

    import sft.training.checkpoint as ck

    extra = ["--train.batch_size=2", "--train.max_steps=6", "--data.packing=false"]
    ref = train(make_cfg(tiny_dir, data_file, tmp_path / "ref", *extra), progress=False).losses
    first = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *extra), progress=False,
                  stop_check=lambda step, loss: "pause" if step == 3 else None)
    assert first.stop_reason == "pause" and first.losses == ref[:3]
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    rest = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *extra), resume=True, progress=False)
    assert len(ref) == 6 and rest.losses == ref[3:]  # exact: fp32 on CPU, same RNG, same data position
    monkeypatch.setattr(ck, "_load_optimizer", lambda *a, **k: None)
    control = train(make_cfg(tiny_dir, data_file, tmp_path / "run2", *extra), resume=True, progress=False)
    assert control.losses[0] == ref[3] and control.losses[1:] != ref[4:]  # the first update differs


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_losses(tiny_dir, data_file, tmp_path, monkeypatch):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("\n".join([f"model: {tiny_dir}", f"output_dir: {tmp_path / 'run'}",
                                   "data:", f"  train: {data_file}", "  max_length: 128", "  packing: false",
                                   f"  cache_dir: {tmp_path / 'cache'}",
                                   "train:", "  lr: 1.0e-3", "  precision: fp32", "  warmup: 0",
                                   "  schedule: constant", "  batch_size: 2", "  max_steps: 8",
                                   "  save_every: 2", "  keep_checkpoints: 2", ""]))
    # The reference runs the same way (a fresh CLI process): an in-process run would inherit this
    # process's torch thread count, which earlier tests may have changed, and with it the float sums.
    assert _run_cli(["train", str(cfg_path), "--output_dir=" + str(tmp_path / "ref")]).returncode == 0
    ref = losses_of(tmp_path / "ref")
    assert len(ref) == 8
    killed = _run_cli(["train", str(cfg_path)], env={"SFT_DEBUG_KILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (tmp_path / "run" / "final").exists()
    again = _run_cli(["train", str(cfg_path)])
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = _run_cli(["train", str(cfg_path), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    assert losses_of(tmp_path / "run") == ref  # exact: fp32 on CPU, same RNG, same data position

    # control: a resume that forgets the optimizer state does not reproduce the losses
    import sft.training.checkpoint as ck

    monkeypatch.setattr(ck, "_load_optimizer", lambda *a, **k: None)
    part = _run_cli(["train", str(cfg_path), "--output_dir=" + str(tmp_path / "run2")],
                    env={"SFT_DEBUG_KILL_AT_STEP": "5"})
    assert part.returncode == -9
    extra = ["--train.batch_size=2", "--train.max_steps=8", "--train.save_every=2", "--data.packing=false",
             "--train.keep_checkpoints=2"]
    train(make_cfg(tiny_dir, data_file, tmp_path / "run2", *extra), resume=True, progress=False)
    control = losses_of(tmp_path / "run2")
    assert control[:4] == ref[:4] and control[4:] != ref[4:]


def test_final_loads_in_plain_transformers(tiny_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "e2e"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# everything from the command line\n")
    r = _run_cli(["train", str(empty), f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={out}",
                  "--train.max_steps=2", "--train.precision=fp32", f"--data.cache_dir={tmp_path / 'cache'}"])
    assert r.returncode == 0, r.stderr
    assert (out / "config.yaml").is_file() and (out / "run_state.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "elapsed_s"}
    final = out / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final))
    gen = GenerationConfig.from_pretrained(str(final))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen.eos_token_id and gen.pad_token_id not in gen.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out_ids = model.generate(**ids, max_new_tokens=3)
    assert out_ids.shape[1] > ids["input_ids"].shape[1]
    again = _run_cli(["train", str(empty), f"--model={tiny_dir}", f"--data.train={data_file}",
                      f"--output_dir={out}"])
    assert again.returncode == 1 and "already holds a run" in again.stderr


def test_lora_saves_adapter_and_merged_model(tiny_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    r = train(make_cfg(tiny_dir, data_file, out, "--train.method=lora", "--lora.r=4", "--lora.dropout=0",
                       "--train.max_steps=3", "--train.lr=1e-2"), progress=False)
    assert len(r.losses) == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "final")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                                             str(out / "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 13, 200, 7]])
    with torch.no_grad():
        m, a, b = (x(input_ids=ids).logits for x in (merged, with_adapter, base))
    torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-5)  # final/ is the adapter merged in
    assert (m - b).abs().max() > 1e-4  # control: the adapter changed the model


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_dir, data_file, tmp_path):
    import signal
    import time

    out = tmp_path / "term"
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sft.cli", "train", str(empty), f"--model={tiny_dir}", f"--data.train={data_file}",
         f"--output_dir={out}", "--train.max_steps=100000", "--train.batch_size=1", "--data.packing=false",
         f"--data.cache_dir={tmp_path / 'cache'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr  # interrupted: checkpoint saved, non-zero like `sft sweep`
    assert "Traceback" not in stderr and "--resume" in stdout
    ckpts = list((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name.startswith("step-") and (ckpts[0] / "state.json").is_file()
    assert not (out / "final").exists()


def test_nan_loss_stops_with_a_clear_message_or_is_skipped(tiny_dir, data_file, tmp_path):
    from sft.errors import NonFiniteLoss

    blow_up = ["--train.lr=1e6", "--train.max_grad_norm=null", "--train.max_steps=6", "--train.batch_size=2"]
    with pytest.raises(NonFiniteLoss, match=r"step \d+: (loss|gradient norm) is (nan|inf).*train.lr=1000000.0.*train.on_nan: skip") as e:
        train(make_cfg(tiny_dir, data_file, tmp_path / "nan", *blow_up), progress=False)
    assert e.value.what in ("loss", "gradient norm") and not math.isfinite(e.value.value)
    assert f"step {e.value.step}: " in str(e.value)
    r = train(make_cfg(tiny_dir, data_file, tmp_path / "skip", *blow_up, "--train.on_nan=skip"), progress=False)
    skipped = json.loads((tmp_path / "skip" / "run_state.json").read_text())["skipped_steps"]
    # the non-finite steps were skipped, not applied: every step is either a logged loss or a skip
    assert skipped >= 1 and len(r.losses) + skipped == 6


def test_nan_skip_keeps_the_weights_finite(tiny_dir, data_file, tmp_path):
    blow_up = ["--train.lr=1e6", "--train.max_grad_norm=null", "--train.max_steps=6", "--train.batch_size=2"]
    train(make_cfg(tiny_dir, data_file, tmp_path / "skip", *blow_up, "--train.on_nan=skip"), progress=False)
    weights = load_file(str(tmp_path / "skip" / "final" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_nan_control_applying_a_nan_step_poisons_the_weights(tiny_dir, data_file, tmp_path, monkeypatch):
    """Control for the finiteness check above: if train_step applied non-finite steps (its guard
    patched away), the same run ends with non-finite weights, so the check can fail."""
    import math
    import types

    patched = types.SimpleNamespace(**{k: getattr(math, k) for k in dir(math) if not k.startswith("_")})
    patched.isfinite = lambda x: True
    monkeypatch.setattr("sft.training.step.math", patched)
    blow_up = ["--train.lr=1e6", "--train.max_grad_norm=null", "--train.max_steps=6", "--train.batch_size=2"]
    train(make_cfg(tiny_dir, data_file, tmp_path / "bad", *blow_up, "--train.on_nan=skip"), progress=False)
    weights = load_file(str(tmp_path / "bad" / "final" / "model.safetensors"))
    assert not all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_eval_every_writes_eval_rows_with_checkpointing_and_neftune(tiny_dir, data_file, tmp_path):
    out = tmp_path / "ev"
    train(make_cfg(tiny_dir, data_file, out, "--eval.split=0.25", "--eval.every=2", "--train.max_steps=4",
                   "--train.gradient_checkpointing=true", "--train.neftune_alpha=5", "--train.batch_size=2"),
          progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_loss"] > 0 for r in evals)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_the_final_held_out_loss_is_printed(tiny_dir, data_file, tmp_path, capsys):
    """With held-out rows and no eval.every or before_after, the tuned model's held-out loss was
    only in metrics.jsonl; the run now says it, as eval.every's lines do."""
    out = tmp_path / "fin"
    train(make_cfg(tiny_dir, data_file, out, "--eval.split=0.25", "--train.max_steps=2"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in rows if "eval_loss" in r]
    assert f"step 2/2 | eval_loss {last['eval_loss']:.4f} (" in capsys.readouterr().out


def test_dev_split_takes_the_held_out_loss_during_training(tiny_dir, data_file, tmp_path):
    """With eval.dev_split, eval.every measures dev_loss (what early stopping and sweeps choose
    on); before/after.json are the test rows, and say so. Control: the eval_loss run above."""
    out = tmp_path / "dev"
    train(make_cfg(tiny_dir, data_file, out, "--eval.split=0.25", "--eval.dev_split=0.25", "--eval.every=2",
                   "--train.max_steps=2", "--train.batch_size=2", "--eval.max_new_tokens=2",
                   "--eval.reference_tokens=128", "--eval.before_after=true"), progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_loss" in r] == [2] and not any("eval_loss" in r for r in rows)
    after = json.loads((out / "after.json").read_text())
    assert after["split"] == "eval" and after["n"]["task_accuracy"] == after["n_examples"]
