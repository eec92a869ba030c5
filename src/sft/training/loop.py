"""`sft train`: the training loop, top to bottom in one function.

Loss of an optimizer step = sum of token CE over all its micro-batches / trained tokens in the
step (reduced over ranks under torchrun), so the batch/accumulation split never changes it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sft.config import Config, save_config
from sft.data.batching import Step, plan_steps
from sft.data.collate import collate_packed_rows, collate_padded
from sft.data.types import IGNORE, Example
from sft.errors import SftError
from sft.models import load as models
from sft.models.save import save_final
from sft.reporting import run_log
from sft.training import checkpoint
from sft.training.loss import token_loss_sum, unwrap
from sft.training.optim import lr_at, make_optimizer


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    stopped_early: bool = False
    stop_reason: str | None = None  # why a stop_check ended the run early (sweep pruning)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(cfg: Config) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return p


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def to_batch(rows: list[list[Example]], packing: bool, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One micro-batch on ``device``: packed rows ``[B, max_length]`` or padded sequences."""
    if packing:
        b = collate_packed_rows(rows, pad_id)
    else:
        b = collate_padded([ex for row in rows for ex in row], pad_id)
    return {k: v.to(device) for k, v in b.items()}


def step_batches(
    step: Step, examples: list[Example], cfg: Config, pad_id: int, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], int, int]:
    """This rank's micro-batches of one optimizer step, and the step's trained and real token
    counts summed over all ranks (the loss divides by the global trained count)."""
    rank, world = rank_and_world()
    micro = [m for i, m in enumerate(step) if i % world == rank]
    batches = [to_batch([[examples[i] for i in row] for row in m], cfg.data.packing, pad_id, device)
               for m in micro]
    counts = torch.tensor(
        [sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches),
         sum(len(examples[i]) for m in micro for row in m for i in row)], device=device,
    )
    if world > 1:
        dist.all_reduce(counts)
    return batches, int(counts[0]), int(counts[1])


def forward_backward(model: Any, batches: list[dict[str, torch.Tensor]], n_trained: int, cfg: Config) -> float:
    """Accumulate the gradients of one optimizer step; return its loss (token-mean over all ranks)."""
    step_loss = torch.zeros((), device=batches[0]["input_ids"].device)
    for b in batches:
        with _autocast(cfg):
            loss_sum, _ = token_loss_sum(model, b)
        (loss_sum / max(1, n_trained)).backward()
        step_loss += loss_sum.detach()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(step_loss)
    return float(step_loss) / max(1, n_trained)


def prepare_model(cfg: Config, model: Any) -> Any:
    """Apply train.method (full | lora), embedding freezing and gradient checkpointing."""
    if cfg.train.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    if cfg.train.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int, accepts float
                lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.method == "lora":
            model.enable_input_require_grads()
    return model


def add_neftune(model: Any, alpha: float) -> Any:
    """NEFTune: uniform noise of scale alpha / sqrt(L * d) on input embeddings while training."""

    def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if module.training:
            dims = output.shape[-2] * output.shape[-1]
            mag = alpha / math.sqrt(dims)
            output = output + torch.zeros_like(output).uniform_(-mag, mag)
        return output

    return model.get_input_embeddings().register_forward_hook(hook)


def eval_loss(model: Any, examples: list[Example], cfg: Config, pad_id: int, device: torch.device) -> float:
    """Mean CE over the trained tokens of ``examples``, masked exactly as in training."""
    model.eval()
    total, count = 0.0, 0
    bs = max(1, cfg.eval.batch_size)
    with torch.no_grad(), _autocast(cfg):
        for k in range(0, len(examples), bs):
            loss_sum, n = token_loss_sum(model, to_batch([[e] for e in examples[k : k + bs]], False, pad_id, device))
            total += float(loss_sum)
            count += n
    model.train()
    return total / max(1, count)


def _autocast(cfg: Config) -> Any:
    if resolve_precision(cfg) == "bf16":
        return torch.autocast(device_type=_device().type, dtype=torch.bfloat16)
    return torch.autocast(device_type=_device().type, enabled=False)


class _Interrupt:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print("\nInterrupt received: finishing this step and saving a checkpoint ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    finished = (out / "final").exists() or (out / "run_state.json").exists()
    if overwrite and out.exists():
        for name in ("checkpoints", "final", "adapter", "metrics.jsonl", "run_state.json", "report.html",
                     "report.md", "report.json", "before.json", "after.json", "config.yaml", "tensorboard"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return
    if resume:
        return
    if finished or (out / "checkpoints").is_dir():
        raise SftError(
            f"{out}: output_dir already holds a run; continue it with --resume, "
            "start again with --overwrite, or set another output_dir"
        )


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
    from sft.data.chat import lint
    from sft.data.pipeline import build_dataset

    rank, _ = rank_and_world()
    out = Path(cfg.output_dir)
    _check_output_dir(out, resume, overwrite)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    device = _device()
    print(f"precision: {resolve_precision(cfg)}", flush=True)

    # ---- data: validated, tokenized and masked before any weights load
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code)
    data = build_dataset(cfg, tokenizer, "train")
    if not data.examples:
        raise SftError("data.train: no usable training examples; run `sft data check CONFIG` to see why")
    for warning in lint(tokenizer, data.template, data.examples):
        print(f"warning: {warning}", file=sys.stderr)
    has_eval = bool(cfg.eval.data) or cfg.eval.split > 0
    eval_examples = build_dataset(cfg, tokenizer, "eval").examples if has_eval else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    plan = plan_steps(
        [len(e) for e in data.examples], cfg.train.batch_size, cfg.train.grad_accum, cfg.data.packing,
        cfg.data.max_length, cfg.train.epochs, cfg.train.max_steps, cfg.train.seed,
    )
    total_steps = len(plan)

    # ---- model
    model = models.load_model(cfg.model, torch.float32, cfg.trust_remote_code)
    before: dict[str, Any] | None = None
    if cfg.eval.before_after and has_eval and rank == 0 and not resume:
        from sft.evaluation.evaluate import evaluate

        print("Evaluating the starting model ...", flush=True)
        before = evaluate(cfg, model, tokenizer, data.template, base_model=None, progress=progress)
        out.mkdir(parents=True, exist_ok=True)
        (out / "before.json").write_text(json.dumps(before, indent=1))
    model = prepare_model(cfg, model).to(device)
    model.train()
    if cfg.train.neftune_alpha:
        add_neftune(model, cfg.train.neftune_alpha)
    optimizer = make_optimizer(model, cfg.train)
    if cfg.train.compile:  # compile the decoder in place: parameter names (and checkpoints) stay the same
        unwrap(model).model.compile()

    # ---- resume
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    start = 0
    best_eval, bad_evals = math.inf, 0
    if resume:
        found = checkpoint.list_checkpoints(ckpt_root)
        if (out / "run_state.json").exists():
            print(f"{out}: this run already finished; nothing to resume (use --overwrite to start again)")
            return RunResult(out, 0)
        if found:
            state = checkpoint.load_checkpoint(found[-1], model, optimizer)
            start = state["step"]
            best_eval, bad_evals = state.get("best_eval", math.inf), state.get("bad_evals", 0)
            if state.get("total_steps") != total_steps:
                raise SftError(f"{found[-1]}: the checkpoint was made for {state.get('total_steps')} steps but the "
                               f"config now gives {total_steps}; resume with the same data and train settings")
            print(f"Resuming from {found[-1]} (step {start}/{total_steps})", flush=True)
        else:
            print(f"{ckpt_root}: no complete checkpoint; starting from the beginning", flush=True)
    save_config(cfg, out / "config.yaml")
    metrics_path = out / "metrics.jsonl"
    run_log.truncate_metrics(metrics_path, start)

    writer = run_log.tensorboard_writer(cfg, out) if rank == 0 else None
    result = RunResult(out, total_steps)
    elapsed_before = run_log.elapsed_at(metrics_path)
    t0 = time.perf_counter()
    bar = run_log.progress_bar(total_steps, start, progress and rank == 0)
    skipped = 0

    # ---- the loop
    with _Interrupt() as interrupt:
        for step in range(start, total_steps):
            lr = lr_at(step, total_steps, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches, n_trained, n_tokens = step_batches(plan[step], data.examples, cfg, pad_id, device)
            try:
                loss = forward_backward(model, batches, n_trained, cfg)
            except torch.OutOfMemoryError:
                raise SftError(
                    f"step {step + 1}: out of memory; lower train.batch_size (now {cfg.train.batch_size}) or "
                    f"data.max_length (now {cfg.data.max_length}), raise train.grad_accum to keep the step size, "
                    "or set train.gradient_checkpointing: true or train.method: lora"
                ) from None
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                if cfg.train.on_nan == "skip":
                    skipped += 1
                    print(f"warning: step {step + 1}: loss is {loss}; step skipped ({skipped} so far)", file=sys.stderr)
                    continue
                last = checkpoint.list_checkpoints(ckpt_root)
                raise SftError(
                    f"step {step + 1}: loss is {loss}. Likely causes: learning rate too high (train.lr={cfg.train.lr}), "
                    "bf16 overflow (try train.precision: fp32), or broken data (check with `sft data check`). "
                    + (f"Last good checkpoint: {last[-1]} (continue with --resume after changing the config). "
                       if last else "No checkpoint was saved. ")
                    + "To skip such steps instead, set train.on_nan: skip"
                )
            grad_norm = float("nan")
            if cfg.train.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss)

            done = step + 1
            elapsed = elapsed_before + time.perf_counter() - t0
            row = {"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                   "tokens": n_tokens, "trained_tokens": n_trained, "elapsed_s": round(elapsed, 3)}
            if rank == 0:
                run_log.append_row(metrics_path, row)
                if writer is not None:
                    for k in ("loss", "lr", "grad_norm"):
                        writer.add_scalar(f"train/{k}", row[k], done)
            run_log.log_step(bar, row, total_steps, start, t0, progress and rank == 0)
            if os.environ.get("SFT_DEBUG_KILL_AT_STEP") == str(done):  # crash tests: die like a SIGKILL
                os.kill(os.getpid(), signal.SIGKILL)

            if has_eval and cfg.eval.every and done % cfg.eval.every == 0 and done < total_steps:
                ev = eval_loss(model, eval_examples, cfg, pad_id, device)
                if rank == 0:
                    run_log.append_row(metrics_path, {"step": done, "eval_loss": round(ev, 6)})
                    run_log.say(bar, f"step {done}/{total_steps} | eval_loss {ev:.4f}")
                if ev < best_eval - 1e-6:
                    best_eval, bad_evals = ev, 0
                else:
                    bad_evals += 1
                if cfg.eval.early_stopping_patience and bad_evals >= cfg.eval.early_stopping_patience:
                    run_log.say(bar, f"Early stopping: eval loss has not improved for {bad_evals} evaluations")
                    result.stopped_early = True
            save_now = bool(cfg.train.save_every and done % cfg.train.save_every == 0 and done < total_steps)
            if (save_now or interrupt.signal is not None) and rank == 0:
                checkpoint.save_checkpoint(
                    ckpt_root, done, model, optimizer,
                    {"total_steps": total_steps, "best_eval": best_eval, "bad_evals": bad_evals},
                    cfg.train.keep_checkpoints,
                )
            reason = stop_check(done, loss) if stop_check is not None else None
            if reason is not None:
                result.stop_reason = reason
                checkpoint.save_checkpoint(
                    ckpt_root, done, model, optimizer,
                    {"total_steps": total_steps, "best_eval": best_eval, "bad_evals": bad_evals},
                    cfg.train.keep_checkpoints,
                )
                run_log.say(bar, f"Stopped at step {done}/{total_steps}: {reason}")
                break
            if interrupt.signal is not None:
                run_log.say(bar, f"Stopped at step {done}/{total_steps}; checkpoint saved. "
                       f"Continue with: sft train CONFIG --resume")
                result.interrupted = True
                break
            if result.stopped_early:
                break
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if result.interrupted or result.stop_reason is not None:
        return result

    # ---- result
    final_eval = eval_loss(model, eval_examples, cfg, pad_id, device) if has_eval else None
    if final_eval is not None and rank == 0:
        run_log.append_row(metrics_path, {"step": total_steps if not result.stopped_early else done, "eval_loss": round(final_eval, 6)})
    if rank == 0:
        final_model = save_final(cfg, model, tokenizer, data.template, out)
        (out / "run_state.json").write_text(json.dumps({"status": "finished", "steps": len(plan), "skipped_steps": skipped}))
        after = None
        if cfg.eval.before_after and has_eval:
            from sft.evaluation.evaluate import evaluate

            print("Evaluating the tuned model ...", flush=True)
            base = models.load_model(cfg.model, torch.float32, cfg.trust_remote_code)
            after = evaluate(cfg, final_model, tokenizer, data.template, base_model=base, progress=progress)
            (out / "after.json").write_text(json.dumps(after, indent=1))
            if before is None and (out / "before.json").exists():
                before = json.loads((out / "before.json").read_text())
        run_log.write_report(out, cfg, data.report.to_dict(), before, after)
        print(f"Done: {out / 'final'}", flush=True)
    return result
