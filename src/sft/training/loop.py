"""`sft train`: set up, loop, finish. Each stage is a named function; the loop fits on a screen.

    setup()   output dir rules, data (validated before any weights load), model, optimizer, resume
    loop()    for each step: train_step (sft.training.step), NaN policy, log, eval, checkpoint, stop
    finish()  final eval loss, final/ (and adapter/), before/after evaluation, report
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sft.atomic import atomic_write_text
from sft.config import Config, save_config, to_dict
from sft.data.batching import Step
from sft.data.types import Example
from sft.errors import NonFiniteLoss, SftError
from sft.evaluation.result import EvalResult
from sft.models import load as models
from sft.models.save import save_dtype, save_final
from sft.reporting.run_log import RunLog, truncate_metrics, write_data_report, write_run_report
from sft.reporting.trackers import Trackers, check_installed, open_trackers
from sft.runtime import Runtime, start
from sft.training import checkpoint, distributed
from sft.training.optim import lr_at, master_weights
from sft.training.precision import to_train_dtype, train_dtype
from sft.training.prepare import TrainData, prepare
from sft.training.run_dir import Interrupt, PreviousRun, check_output_dir
from sft.training.state import RunState
from sft.training.step import StepResult, train_step

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sft.data.report import Dataset


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False
    stop_reason: str | None = None  # why a stop_check ended the run early (sweep pruning)
    last_step: int = 0  # the last optimizer step taken


@dataclass
class Run:
    """Everything the loop needs, built by ``setup``."""

    cfg: Config
    out: Path
    tokenizer: PreTrainedTokenizerBase
    data: Dataset
    eval_examples: Sequence[Example]
    plan: Sequence[Step]
    model: Any
    optimizer: torch.optim.Optimizer
    rt: Runtime  # rank, world, device, precision of this process
    pad_id: int
    start: int = 0
    best_eval: float = math.inf
    bad_evals: int = 0
    skipped: int = 0
    before: EvalResult | None = None
    module: Any = None  # what the step calls: the DDP / FSDP2 wrapper under torchrun, else the model
    trackers: Trackers | None = None  # train.report_to (rank 0)

    @property
    def has_eval(self) -> bool:
        return self.cfg.eval.has_test

    @property
    def held_key(self) -> str:
        """What the held-out loss during training is measured on: dev when there is a dev set
        (eval.dev / eval.dev_split: choices such as early stopping never look at the test rows)."""
        return "dev_loss" if self.cfg.eval.has_dev else "eval_loss"

    def state(self) -> RunState:
        """What a checkpoint records besides weights and optimizer (see sft.training.checkpoint)."""
        return {"total_steps": len(self.plan), "best_eval": self.best_eval, "bad_evals": self.bad_evals,
                "skipped_steps": self.skipped, "config": checkpoint.resume_config(self.cfg)}


def train(
    cfg: Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_check: Callable[[int, float], str | None] | None = None,
) -> RunResult:
    """Run ``sft train`` for ``cfg``; returns the per-step losses of this invocation.

    ``stop_check(step, loss)`` (used by ``sft sweep`` to prune) may return a reason to stop: the
    run then saves a checkpoint and ends without writing ``final/``.
    """
    rt = start(cfg)  # under torchrun: join the process group (one process: rank 0 of 1)
    # --overwrite: the old run waits in .previous-run until this one saves, and comes back if it fails first
    with PreviousRun(Path(cfg.output_dir), overwrite, active=rt.main) as previous:
        run = setup(cfg, rt, resume, overwrite, progress, previous)
        if run is None:
            rt.shutdown()
            return RunResult(Path(cfg.output_dir), 0)
        try:
            result = loop(run, progress, stop_check)
            if not (result.interrupted or result.stop_reason is not None):
                finish(run, result, progress)
        finally:
            if run.trackers is not None:
                run.trackers.close()
        del run  # the model first: FSDP2's state holds the process group that rt.shutdown() frees
    rt.shutdown()  # ranks wait here while rank 0 writes final/ and the report
    return result


# ---------------------------------------------------------------------------------------------
# setup


def setup(cfg: Config, rt: Runtime, resume: bool, overwrite: bool, progress: bool, previous: PreviousRun) -> Run | None:
    """Data, model, optimizer (``prepare``, shared with bench and lr-find) and resumed state; None
    when ``--resume`` finds a finished run."""
    out = Path(cfg.output_dir)
    check_output_dir(out, resume, overwrite)
    check_installed(cfg.train.report_to)  # a missing tracker package fails before the data loads
    if resume and (out / "run_state.json").exists():
        print(f"{out}: this run already finished; nothing to resume (use --overwrite to start again)")
        return None
    world = rt.world
    if rt.main:
        print(f"precision: {rt.precision}", flush=True)
        if world > 1:
            print(f"processes: {world} | global batch {cfg.train.batch_size} x {cfg.train.grad_accum} x {world} = "
                  f"{cfg.train.batch_size * cfg.train.grad_accum * world} "
                  f"{'packed rows' if cfg.data.packing else 'sequences'} per step", flush=True)
    has_eval = cfg.eval.has_test
    held = "dev" if cfg.eval.has_dev else "eval"  # eval.every, early stopping and the final held-out loss
    ba_split = cfg.eval.before_after_split  # before/after.json: the test rows, or dev for sweep trials
    before: EvalResult | None = None

    def before_training(model: Any, data: TrainData) -> None:
        """With the data valid and the model loaded: the old run aside, the "before" evaluation."""
        nonlocal before
        previous.set_aside()  # --overwrite: only now, with the data valid and the model loaded
        out.mkdir(parents=True, exist_ok=True)
        rt.barrier()
        if cfg.eval.before_after and (has_eval or ba_split == "dev") and rt.main and not resume:
            from sft.evaluation.evaluate import evaluate

            print("Evaluating the starting model ...", flush=True)
            # rank 0 alone: the other ranks wait in the barrier below, not in the evaluation's collectives
            before = evaluate(cfg, model.to(rt.device), data.tokenizer, data.data.template, base_model=None,
                              progress=progress, split=ba_split, rt=rt.alone())
            atomic_write_text(out / "before.json", json.dumps(before, indent=1))
        rt.barrier()  # the other ranks wait for rank 0's "before" evaluation

    prepared = prepare(cfg, rt, cfg.train.max_steps, held if has_eval or held == "dev" else None, before_training)
    model, optimizer = prepared.model, prepared.optimizer
    eval_examples = prepared.eval_examples
    module, optimizer = distributed.wrap(cfg, rt, model, optimizer)  # one process: (model, optimizer)
    run = Run(cfg, out, prepared.tokenizer, prepared.data, eval_examples, prepared.plan, model, optimizer,
              rt, prepared.pad_id, before=before, module=module)
    if resume:
        restore(run)
    if rt.main:
        save_config(cfg, out / "config.yaml")
        truncate_metrics(out / "metrics.jsonl", run.start)
        write_data_report(out, prepared.data.report.to_dict(), prepared.data.quality)  # for sft ui
        run.trackers = open_trackers(cfg.train.report_to, out, to_dict(cfg), prepared.data.report.to_dict())
    return run


def restore(run: Run) -> None:
    """Continue from the newest complete checkpoint (weights, optimizer, RNG, counters)."""
    root = run.out / "checkpoints"
    found = checkpoint.list_checkpoints(root)
    if not found:
        print(f"{root}: no complete checkpoint; starting from the beginning", flush=True)
        return
    checkpoint.check_resume(found[-1], checkpoint.read_state(found[-1]), run.cfg, run.rt)  # before any weight loads
    state = checkpoint.load_checkpoint(found[-1], run.model, run.optimizer, run.rt)
    if state.get("total_steps") != len(run.plan):
        raise SftError(f"{found[-1]}: the checkpoint was made for {state.get('total_steps')} steps but the "
                       f"config now gives {len(run.plan)}; resume with the same data and train settings")
    run.start = state["step"]
    run.best_eval, run.bad_evals = state.get("best_eval", math.inf), state.get("bad_evals", 0)
    run.skipped = state.get("skipped_steps", 0)
    if run.rt.main:
        print(f"Resuming from {found[-1]} (step {run.start}/{len(run.plan)})", flush=True)


# ---------------------------------------------------------------------------------------------
# the loop


def loop(run: Run, progress: bool, stop_check: Callable[[int, float], str | None] | None) -> RunResult:
    cfg, total = run.cfg, len(run.plan)
    result = RunResult(run.out, total)
    log = RunLog(cfg, run.out, total, run.start, show=progress and run.rt.main, write=run.rt.main,
                 trackers=run.trackers)
    with Interrupt() as interrupt:
        for step in range(run.start, total):
            lr = lr_at(step, total, cfg.train)
            r = guarded_step(run, step, lr)
            if not r.applied:
                on_nan(run, step, r)  # raises, or counts a skipped step
                continue
            done = result.last_step = step + 1
            result.losses.append(r.loss)
            log.step({"step": done, "loss": round(r.loss, 6), "lr": lr, "grad_norm": round(r.grad_norm, 6),
                      "tokens": r.tokens, "trained_tokens": r.trained_tokens, "elapsed_s": round(log.elapsed(), 3)})
            if os.environ.get("SFT_DEBUG_KILL_AT_STEP") == str(done):  # crash tests: die like a SIGKILL
                os.kill(os.getpid(), signal.SIGKILL)
            if run.eval_examples and cfg.eval.every and done % cfg.eval.every == 0 and done < total:
                result.stopped_early = evaluate_during(run, log, done)
            reason = stop_check(done, r.loss) if stop_check is not None else None
            periodic = bool(cfg.train.save_every and done % cfg.train.save_every == 0 and done < total)
            # every rank must agree to stop (and save) at the same step, whichever one saw the signal
            signalled = run.rt.any_rank(interrupt.signal is not None)
            if periodic or signalled or reason is not None:
                save_checkpoint(run, done)
            if reason is not None:
                result.stop_reason = reason
                log.say(f"Stopped at step {done}/{total}: {reason}")
                break
            if signalled:
                log.say(f"Stopped at step {done}/{total}; checkpoint saved. Continue with: sft train CONFIG --resume")
                result.interrupted = True
                break
            if result.stopped_early:
                break
    log.close()
    return result


def guarded_step(run: Run, step: int, lr: float) -> StepResult:
    """``train_step``, with running out of memory turned into advice."""
    cfg = run.cfg
    try:
        return train_step(run.module, run.optimizer, run.plan[step], run.data.examples, cfg, run.pad_id,
                          run.rt, lr)
    except torch.OutOfMemoryError:
        raise SftError(
            f"step {step + 1}: out of memory; lower train.batch_size (now {cfg.train.batch_size}) or "
            f"data.max_length (now {cfg.data.max_length}), raise train.grad_accum to keep the step size, "
            "or set train.gradient_checkpointing: true or train.method: lora"
        ) from None


def on_nan(run: Run, step: int, r: StepResult) -> None:
    """``train.on_nan``: ``skip`` counts the step (its gradients are already dropped); ``stop`` raises
    ``NonFiniteLoss`` (the step, what was non-finite, its value) with the likely causes."""
    cfg = run.cfg
    bad, value = ("loss", r.loss) if not math.isfinite(r.loss) else ("gradient norm", r.grad_norm)
    what = f"loss is {r.loss}" if bad == "loss" else f"gradient norm is {r.grad_norm} (loss {r.loss:.4f})"
    if cfg.train.on_nan == "skip":
        run.skipped += 1
        print(f"warning: step {step + 1}: {what}; step skipped ({run.skipped} so far)", file=sys.stderr)
        return
    last = checkpoint.list_checkpoints(run.out / "checkpoints")
    raise NonFiniteLoss(
        f"step {step + 1}: {what}. Likely causes: learning rate too high (train.lr={cfg.train.lr}), "
        "bf16 overflow (try train.precision: fp32), or broken data (check with `sft data check`). "
        + (f"Last good checkpoint: {last[-1]} (continue with --resume after changing the config). "
           if last else "No checkpoint was saved. ")
        + "To skip such steps instead, set train.on_nan: skip",
        step=step + 1, what=bad, value=value,
    )


def evaluate_during(run: Run, log: RunLog, done: int) -> bool:
    """Held-out loss every ``eval.every`` steps; True when early stopping says stop."""
    from sft.evaluation.heldout import heldout_loss

    ev, _ = heldout_loss(run.module, run.eval_examples, run.pad_id, run.cfg, run.rt)  # split over ranks
    if ev is None:
        return False
    log.eval(done, ev, run.held_key)
    if ev < run.best_eval - 1e-6:
        run.best_eval, run.bad_evals = ev, 0
    else:
        run.bad_evals += 1
    patience = run.cfg.eval.early_stopping_patience
    if patience and run.bad_evals >= patience:
        log.say(f"Early stopping: {run.held_key.replace('_', ' ')} has not improved for {run.bad_evals} evaluations")
        return True
    return False


def save_checkpoint(run: Run, done: int) -> None:
    """Every rank calls it: DDP and one process write from rank 0, FSDP2 from every rank."""
    checkpoint.save_checkpoint(run.out / "checkpoints", done, run.model, run.optimizer, run.state(),
                               run.cfg.train.keep_checkpoints, run.rt)


# ---------------------------------------------------------------------------------------------
# finish


def finish(run: Run, result: RunResult, progress: bool) -> None:
    """Final held-out loss, ``final/`` (and ``adapter/``), the before/after evaluation, the report."""
    from sft.evaluation.heldout import heldout_loss
    from sft.reporting.run_log import append_row

    cfg, out, rt = run.cfg, run.out, run.rt
    last_step = result.last_step if result.stopped_early else len(run.plan)
    final_eval = heldout_loss(run.module, run.eval_examples, run.pad_id, cfg, rt)[0] if run.eval_examples else None
    model = run.model
    if distributed.is_sharded(run.model):  # FSDP2: gather the whole model on rank 0 to save final/
        from sft.training.prepare import prepare_model

        full = checkpoint.full_state_dict(run.model, rt)
        if rt.main:
            model = prepare_model(cfg, models.load_model(cfg.model, torch.float32, cfg.trust_remote_code, revision=cfg.revision))
            model.load_state_dict(full)
    if not rt.main:
        return
    if final_eval is not None:
        append_row(out / "metrics.jsonl", {"step": last_step, run.held_key: round(final_eval, 6)})
        if run.trackers is not None:
            run.trackers.log_row({"step": last_step, run.held_key: final_eval})
        if progress:  # the line eval.every prints, for the tuned model
            print(f"step {last_step}/{len(run.plan)} | {run.held_key} {final_eval:.4f} "
                  f"({len(run.eval_examples)} held-out examples)", flush=True)
    # evaluated in the training dtype, as the "before" evaluation was (prepare() hands it the model
    # loaded in train_dtype): before and after differ by the training, not by the precision
    # a bf16 run saved in another dtype saves its fp32 master weights (in bf16, the bf16 weights it trained are final/)
    masters = None if model is not run.model or save_dtype(cfg) == torch.bfloat16 else master_weights(run.optimizer, model)
    final_model = to_train_dtype(save_final(cfg, model, run.tokenizer, run.data.template, out, masters), cfg).to(rt.device)
    atomic_write_text(out / "run_state.json", json.dumps({"status": "finished", "steps": len(run.plan),
                                                    "skipped_steps": run.skipped}))
    after = None
    if cfg.eval.before_after and (run.has_eval or cfg.eval.before_after_split == "dev"):
        from sft.evaluation.evaluate import evaluate

        print("Evaluating the tuned model ...", flush=True)
        base = models.load_model(cfg.model, train_dtype(cfg), cfg.trust_remote_code, revision=cfg.revision).to(rt.device)
        # rank 0 alone: the other ranks have left for the final barrier (in rt.shutdown)
        after = evaluate(cfg, final_model, run.tokenizer, run.data.template, base_model=base, progress=progress,
                         split=cfg.eval.before_after_split, rt=rt.alone())
        atomic_write_text(out / "after.json", json.dumps(after, indent=1))
        if run.trackers is not None:
            run.trackers.before_after(run.before, after)
        if run.before is None and (out / "before.json").exists():
            run.before = json.loads((out / "before.json").read_text())
    comparison = None
    if run.before is not None and after is not None:
        from sft.evaluation.compare import compare_two

        comparison = compare_two(dict(run.before), dict(after))  # the same paired tests as `sft compare`
    write_run_report(out, cfg, run.data.report.to_dict(), run.before, after, comparison)
    print(f"Done: {out / 'final'}", flush=True)
