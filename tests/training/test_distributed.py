"""Many processes (torchrun, gloo on this CPU) are proven equal to one process; each proof has a
control that shows it can fail.

- ``sft train --nproc 2`` with DDP and with FSDP2 vs one process with the same global step
  (2 processes x grad_accum 2 == 1 process x grad_accum 4), packing on and off: per-step losses
  within 1e-6 relative, final weights within 1e-6; the plans hold steps of 4 micro-batches (DDP
  accumulates the first of each rank's two under ``no_sync``) and steps with fewer micro-batches
  than processes (an epoch's short last step: 1), where one rank trains nothing; LoRA likewise;
- controls: gradients never all-reduced (DDP) or normalised per rank (FSDP2) differ;
- pure bf16 under FSDP2: ``nearest`` rounding tracks one process and resumes exactly after a
  SIGKILL; ``stochastic`` (the rounding the rebuilt optimizer must keep) differs;
- SIGKILL of the whole 2-process job, ``--resume``: the losses of an uninterrupted 2-process run;
- ``sft eval`` under torchrun == one process; held-out loss without the all-reduce differs;
- resume refuses changed settings (naming the key) and a checkpoint missing a trainable weight;
- after ``sft train`` (DDP, FSDP2) and ``sft eval`` under torchrun no gloo thread is left, so none
  can free tensors during interpreter shutdown; control: a reference held to the group keeps them.

The 2-process runs are slow (~30 s each on the 2-core CI machine, mostly start-up): marked slow.
Learning rate 1e-4: AdamW divides by sqrt(v), so a weight whose gradient is ~0 turns the float
rounding of a different summation order (micro-batch gradients summed on 2 ranks, then averaged)
into an update of up to ~lr; at lr 1e-3 one weight of 1.6M differed by 3.3e-6 (all others < 3e-7).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sft.config import load_config
from sft.errors import SftError
from sft.training.loop import train

HERE = Path(__file__).parent


def overrides(tiny_dir: Path, data_file: Path, out: Path, *extra: str) -> list[str]:
    return [f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={out}", "--train.lr=1e-4",
            "--train.precision=fp32", "--train.warmup=0", "--train.schedule=constant", "--data.max_length=128",
            f"--data.cache_dir={out.parent / 'cache'}", "--train.batch_size=1", "--train.threads=1",
            "--train.max_steps=6", "--train.save_every=2", "--train.keep_checkpoints=5", *extra]


def losses_of(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights_of(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def sft_cli(args: list[str], env: dict[str, str] | None = None, script: list[str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    """``python -m sft ARGS`` (``--nproc 2`` starts torchrun), or ``script`` under torchrun."""
    cmd = [sys.executable, "-m", "sft", *args]
    if script is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *script, *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)


class Runs:
    """Runs shared by several tests of this module, each made once on first use."""

    def __init__(self, root: Path, tiny_dir: Path, data_file: Path) -> None:
        self.root, self.tiny_dir, self.data_file = root, tiny_dir, data_file
        self.cfg_file = root / "c.yaml"
        self.cfg_file.write_text("{}\n")
        self.done: dict[str, Path] = {}

    def args(self, name: str, *extra: str) -> list[str]:
        return overrides(self.tiny_dir, self.data_file, self.root / name, *extra)

    def one(self, name: str, *extra: str) -> Path:
        """One process, grad_accum 4: the global step of 2 processes x grad_accum 2."""
        if name not in self.done:
            threads = torch.get_num_threads()  # train.threads=1 as in each torchrun process
            train(load_config(None, self.args(name, "--train.grad_accum=4", *extra)), progress=False)
            torch.set_num_threads(threads)
            self.done[name] = self.root / name
        return self.done[name]

    def two(self, parallel: str, packing: bool) -> Path:
        name = f"{parallel}-{packing}"
        if name not in self.done:
            r = sft_cli(["train", str(self.cfg_file), "--nproc", "2",
                         *self.args(name, "--train.grad_accum=2", f"--train.parallel={parallel}",
                                    f"--data.packing={packing}")])
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            assert "global batch 1 x 2 x 2 = 4" in r.stdout
            self.done[name] = self.root / name
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any, tiny_dir: Path, data_file: Path) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"), tiny_dir, data_file)


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses_of(a), losses_of(b)
    assert len(la) == len(lb) == 6
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-6 * abs(x), (la, lb)
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 1e-6, worst


def micro_batches_per_step(packing: bool, examples: list[int]) -> list[int]:
    from sft.data.batching import plan_steps

    return [len(s) for s in plan_steps(examples, 1, 4, packing, 128, 1.0, 6, seed=42)]


def example_lengths(runs: Runs, packing: bool) -> list[int]:
    from sft.data.pipeline import build_dataset
    from sft.models.load import load_tokenizer

    cfg = load_config(None, runs.args("lengths", f"--data.packing={packing}"))
    return [len(e) for e in build_dataset(cfg, load_tokenizer(str(runs.tiny_dir))).examples]


# ---------------------------------------------------------------------------------------------
# 2 processes == 1 process


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("packing", [False, True])
def test_two_processes_equal_one(runs: Runs, parallel: str, packing: bool) -> None:
    sizes = micro_batches_per_step(packing, example_lengths(runs, packing))
    assert 4 in sizes and 1 in sizes  # no_sync (2 per rank) and a rank with no micro-batch are both covered
    one, two = runs.one(f"one-{packing}", f"--data.packing={packing}"), runs.two(parallel, packing)
    assert_same_run(one, two)
    start = load_file(str(runs.tiny_dir / "model.safetensors"))
    assert any(not torch.equal(weights_of(two)[k], start[k]) for k in start)  # training moved the weights
    if parallel == "fsdp":  # FSDP2 checkpoints are per-rank shards written by torch.distributed.checkpoint
        shards = sorted(p.name for p in (two / "checkpoints" / "step-2" / "model").iterdir())
        assert len(shards) == 2 and all(s.endswith(".safetensors") for s in shards)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_two_processes_equal_one(runs: Runs, parallel: str) -> None:
    """LoRA under both wrappers (dropout 0: dropout draws other random masks on 2 processes)."""
    lora = ["--train.method=lora", "--lora.dropout=0", "--train.lr=1e-3", "--data.packing=false"]
    out = runs.root / f"lora-{parallel}"
    r = sft_cli(["train", str(runs.cfg_file), "--nproc", "2",
                 *runs.args(out.name, "--train.grad_accum=2", f"--train.parallel={parallel}", *lora)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_run(runs.one("lora-one", *lora), out)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_bf16_keeps_the_rounding_equals_one_process_and_resumes(runs: Runs) -> None:
    """Pure bf16 (fp32 masters in ``MasterAdamW``) under FSDP2: the optimizer rebuilt over the
    sharded parameters keeps ``train.bf16_rounding`` (it fell back to ``nearest``, whose copy had no
    DTensor rule: every bf16 FSDP2 run stopped at step 1). ``nearest`` is deterministic, so 2
    processes track one process; ``stochastic`` draws other noise on shards and differs from it."""
    bf16 = ["--train.precision=bf16", "--data.packing=false", "--train.lr=1e-3"]
    one = runs.one("bf16-one-nearest", *bf16, "--train.bf16_rounding=nearest")
    outs = {}
    for rounding in ("nearest", "stochastic"):
        out = runs.root / f"bf16-fsdp-{rounding}"
        r = sft_cli(["train", str(runs.cfg_file), "--nproc", "2",
                     *runs.args(out.name, "--train.grad_accum=2", "--train.parallel=fsdp", *bf16,
                                f"--train.bf16_rounding={rounding}")])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs[rounding] = losses_of(out)
    la, lb, lc = losses_of(one), outs["nearest"], outs["stochastic"]
    assert len(la) == len(lb) == len(lc) == 6
    nearest, stochastic = (max(abs(x - y) / x for x, y in zip(la, run)) for run in (lb, lc))
    # measured on the 2-core CI-like VM: nearest 1.4e-5 (the summation order of 2 ranks), stochastic 9.6e-5
    assert nearest < 5e-5, (la, lb)
    assert stochastic > 3 * nearest, (la, lb, lc)  # with the rounding lost, stochastic would be nearest
    # SIGKILL after step 3 and --resume from step 2's sharded checkpoint: the masters come back (they
    # are keyed by parameter names there), so the losses are those of the uninterrupted run
    out = runs.root / "bf16-fsdp-killed"
    cmd = ["train", str(runs.cfg_file), "--nproc", "2", *runs.args(out.name, "--train.grad_accum=2",
                                                                   "--train.parallel=fsdp", *bf16, "--train.bf16_rounding=nearest")]
    assert sft_cli(cmd, env={"SFT_DEBUG_KILL_AT_STEP": "3"}).returncode != 0
    resumed = sft_cli([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses_of(out) == lb


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "mode"), [("ddp", "nosync"), ("ddp", "per_rank"), ("fsdp", "per_rank")])
def test_broken_gradient_reduction_differs(runs: Runs, parallel: str, mode: str) -> None:
    """Controls: the same 2-process run with gradients never all-reduced, or each rank's loss
    normalised by its own tokens, does not give the one-process run."""
    out = runs.root / f"broken-{parallel}-{mode}"
    r = sft_cli(["train", str(runs.cfg_file), *runs.args(out.name, "--train.grad_accum=2",
                                                          f"--train.parallel={parallel}", "--data.packing=false")],
                script=[str(HERE / "broken_dist.py"), mode])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = runs.one("one-False", "--data.packing=false")
    la, lb = losses_of(one), losses_of(out)
    wa, wb = weights_of(one), weights_of(out)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert max(abs(x - y) / x for x, y in zip(la, lb)) > 1e-5 or worst > 1e-4, (la, lb, worst)
    assert worst > 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "mode"), [("ddp", "plain"), ("fsdp", "plain"), ("fsdp", "hold")])
def test_process_group_is_gone_before_python_exits(runs: Runs, parallel: str, mode: str) -> None:
    """After ``sft train`` returns, no gloo thread is left in either process: a gloo worker alive at
    interpreter shutdown can free a collective's tensors there and abort the process (CI saw
    "terminate called without an active exception" from FSDP2 1 run in ~50). Before the fix, both
    wrappers kept the group (torch.distributed.nn's default arguments, FSDP2's DeviceMesh).
    Control (``hold``): a reference kept to the group leaves its threads alive, and this sees them."""
    out = runs.root / f"exit-{parallel}-{mode}"
    r = sft_cli(["train", str(runs.cfg_file), *runs.args(out.name, "--train.grad_accum=2", "--train.max_steps=2",
                                                          f"--train.parallel={parallel}")],
                script=[str(HERE / "exit_threads.py"), mode])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    counts = sorted(re.findall(r"rank (\d): gloo threads after sft: (\d+)", r.stdout))
    assert [rank for rank, _ in counts] == ["0", "1"], r.stdout[-3000:]
    if mode == "plain":
        assert all(n == "0" for _, n in counts), counts
    else:
        assert all(int(n) >= 2 for _, n in counts), counts  # the tcp loop and the worker threads


# ---------------------------------------------------------------------------------------------
# kill the whole job, resume


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sigkill_and_resume_equals_uninterrupted(runs: Runs, parallel: str) -> None:
    ref = runs.two(parallel, False)
    out = runs.root / f"killed-{parallel}"
    cmd = ["train", str(runs.cfg_file), "--nproc", "2", *runs.args(out.name, "--train.grad_accum=2",
                                                                   f"--train.parallel={parallel}", "--data.packing=false")]
    killed = sft_cli(cmd, env={"SFT_DEBUG_KILL_AT_STEP": "3"})  # every process SIGKILLs itself after step 3
    assert killed.returncode != 0
    assert not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-2"]
    resumed = sft_cli([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("Resuming from") == 1  # rank 0 alone prints
    assert losses_of(out) == losses_of(ref)  # exact: same world size, same RNG, same data position
    wa, wb = weights_of(ref), weights_of(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# distributed evaluation


@pytest.mark.slow
def test_distributed_eval_equals_one_process(runs: Runs) -> None:
    from sft.evaluation.evaluate import run_eval

    ev = [f"--model={runs.tiny_dir}", f"--data.train={runs.data_file}", f"--eval.data={runs.data_file}",
          "--eval.batch_size=2", "--eval.max_new_tokens=8", "--eval.reference_tokens=128", "--data.max_length=128",
          "--train.precision=fp32",
          f"--data.cache_dir={runs.root / 'cache'}"]
    run_eval(load_config(None, ev), out=str(runs.root / "eval1.json"))
    r = sft_cli(["eval", str(runs.cfg_file), *ev, "--out", str(runs.root / "eval2.json")],
                script=[str(HERE / "exit_threads.py"), "plain"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the group is gone before Python exits (see test_process_group_is_gone_before_python_exits)
    assert sorted(re.findall(r"rank (\d): gloo threads after sft: (\d+)", r.stdout)) == [("0", "0"), ("1", "0")]
    one = json.loads((runs.root / "eval1.json").read_text())
    two = json.loads((runs.root / "eval2.json").read_text())
    assert one["eval_tokens"] == two["eval_tokens"] > 0
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-9)
    for key in ("task_accuracy", "stop_rate", "mean_response_tokens", "samples", "n_examples"):
        assert one[key] == two[key], key


def test_heldout_split_without_all_reduce_differs(tiny_llama_model: Any, smol_tok: Any, data_file: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the distributed held-out loss: rank 0's share alone (no all-reduce) is another number."""
    import sft.evaluation.heldout as heldout
    from sft.data.pipeline import build_dataset
    from sft.runtime import Runtime

    cfg = load_config(None, [f"--data.train={data_file}", "--eval.batch_size=2", "--train.precision=fp32",
                             f"--data.cache_dir={tmp_path}"])
    examples = build_dataset(cfg, smol_tok).examples
    full, n_full = heldout.heldout_loss(tiny_llama_model, examples, 0, cfg, Runtime())
    monkeypatch.setattr(Runtime, "all_sum", lambda self, values: values)  # rank 0 of 2, the sums not reduced
    half, n_half = heldout.heldout_loss(tiny_llama_model, examples, 0, cfg, Runtime(rank=0, world=2))
    assert full is not None and half is not None
    assert 0 < n_half < n_full and abs(full - half) > 1e-4


# ---------------------------------------------------------------------------------------------
# no rank without a process group; resume must match its checkpoint


def test_world_size_without_process_group_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from sft import runtime

    cfg = load_config(None, ["--train.precision=fp32"])
    rt = runtime.local(cfg)
    assert (rt.rank, rt.world, rt.main, rt.precision) == (0, 1, True, "fp32")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SftError, match="WORLD_SIZE=2: this command runs on one process"):
        runtime.local(cfg)


def test_resume_refuses_changed_settings_naming_the_key(tiny_dir: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    base = overrides(tiny_dir, data_file, out, "--data.packing=false", "--train.max_steps=3")
    first = train(load_config(None, base), progress=False, stop_check=lambda step, loss: "pause" if step == 1 else None)
    assert first.stop_reason == "pause" and (out / "checkpoints" / "step-1").is_dir()
    for changed, key in [("--train.lr=2e-4", "train.lr"), ("--data.max_length=96", "data.max_length"),
                         ("--train.grad_accum=2", "train.grad_accum"), (f"--model={tiny_dir}/", "model")]:
        with pytest.raises(SftError, match=f"{key.replace('.', '[.]')} was .* when the checkpoint was made"):
            train(load_config(None, [*base, changed]), resume=True, progress=False)
    # control: the same settings (and a different evaluation or save cadence) resume
    done = train(load_config(None, [*base, "--train.save_every=1", "--eval.every=5"]), resume=True, progress=False)
    assert done.last_step == 3 and len(done.losses) == 2


def test_load_checkpoint_requires_every_trainable_parameter(tiny_llama_model: Any, tmp_path: Path) -> None:
    from sft.runtime import Runtime
    from sft.training import checkpoint
    from sft.training.optim import make_optimizer

    cfg = load_config(None, [])
    opt = make_optimizer(tiny_llama_model, cfg.train)
    path = checkpoint.save_checkpoint(tmp_path / "ck", 1, tiny_llama_model, opt, {}, keep=2, rt=Runtime())
    checkpoint.load_checkpoint(path, tiny_llama_model, opt, Runtime())  # control: a whole checkpoint loads
    weights = load_file(str(path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(SftError, match=re.escape("trainable parameter model.layers.1.mlp.up_proj.weight is not in")):
        checkpoint.load_checkpoint(path, tiny_llama_model, opt, Runtime())
