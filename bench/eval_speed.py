"""Where an evaluation's time goes, and what the run's precision changes: the demo's eval set on
its model (or CONFIG's), each stage timed in fp32 and under bf16 autocast, side by side in one
process.

    .venv/bin/python bench/eval_speed.py [examples/demo/demo.yaml] [--reference-tokens 4096]

Stages: held-out loss (one batched pass, ``heldout_loss``; and per example, ``heldout_losses``,
what the intervals resample), greedy generation of every eval prompt (``eval.max_new_tokens``,
``eval.batch_size``), and reference perplexity (``forgetting``). Prints seconds and the figure
each stage produced, so a speed-up that changed the result shows up next to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sft.config import Config, load_config
from sft.data.chat import prompt_ids, resolve_template, stop_token_ids
from sft.data.pipeline import build_dataset, load_conversations
from sft.data.types import Example
from sft.evaluation.evaluate import forgetting
from sft.evaluation.generate import generate_batch
from sft.evaluation.heldout import heldout_loss, heldout_losses
from sft.evaluation.reference import load_reference
from sft.evaluation.task import split_reference
from sft.models.load import load_model, load_tokenizer
from sft.models.save import pick_pad_id
from sft.runtime import bf16_supported, local


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("config", nargs="?", default="examples/demo/demo.yaml")
    ap.add_argument("--reference-tokens", type=int, default=4096)
    args = ap.parse_args()
    cfg = load_config(args.config)
    tok = load_tokenizer(cfg.model)
    template = resolve_template(cfg.data.template, tok, cfg.base_dir, cfg.data.template_kwargs)
    model = load_model(cfg.model).eval()  # fp32 weights; the bf16 rows run under autocast
    stops = stop_token_ids(tok, template)
    pad = pick_pad_id(tok, stops)
    examples = build_dataset(cfg, tok, "eval").examples
    convs, _ = load_conversations(cfg, "eval")
    prompts = [prompt_ids(parts[0], tok, template) for c in convs if (parts := split_reference(c))]
    ref = load_reference(cfg.eval.reference).text
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"avx512_bf16 {'avx512_bf16' in flags}, amx {'amx_tile' in flags}, load {os.getloadavg()[0]:.2f}")
    print(f"# {len(examples)} eval examples, {len(prompts)} prompts x {cfg.eval.max_new_tokens} new tokens, "
          f"{args.reference_tokens} reference tokens")
    print("| stage | precision | seconds | result |\n|---|---|---|---|")
    for prec in ["fp32", "bf16"] if bf16_supported() else ["fp32"]:
        pcfg = load_config(args.config, [f"--train.precision={prec}"])
        for name, (dt, out) in stages(pcfg, model, tok, examples, prompts, pad, stops, ref, args.reference_tokens):
            shown = f"{out:.4f}" if isinstance(out, float) else str(out)
            print(f"| {name} | {prec} | {dt:.1f} | {shown} |", flush=True)


def stages(cfg: Config, model: Any, tok: Any, examples: Sequence[Example], prompts: list[list[int]], pad: int,
           stops: list[int], ref: str, reference_tokens: int) -> list[tuple[str, tuple[float, Any]]]:
    """(stage, (seconds, result)) of each stage under ``cfg``'s precision."""
    rt = local(cfg)  # the held-out functions enter rt.autocast() themselves
    with torch.no_grad(), rt.autocast():
        return [
            ("held-out loss, batched", timed(lambda: heldout_loss(model, examples, pad, cfg, rt)[0])),
            ("held-out loss, per example (CE sum)",
             timed(lambda: sum(v for v, _ in heldout_losses(model, examples, pad, cfg, rt)))),
            ("generation (new tokens)", timed(lambda: sum(len(g.token_ids) for g in generate_batch(
                model, tok, prompts, stops, cfg.eval.max_new_tokens, cfg.eval.batch_size)))),
            ("reference perplexity",
             timed(lambda: forgetting(model, tok, ref, None, reference_tokens)["reference_perplexity"])),
        ]

if __name__ == "__main__":
    main()
