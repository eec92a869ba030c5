"""Training quality of pure bf16 (bf16 weights + fp32 master weights) against fp32, where the gap
comes from, and the failure of a naive bf16 AdamW (bf16 weights and moments, no master copy).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bf16_quality.py [--steps 200] [--append]

`sft train` runs of SmolLM2-135M-Instruct on the same alpaca rows, plan and seed (eager:
`train.compile: false`, but for `bf16_compiled`), differing only in precision: fp32; bf16 with
`train.bf16_rounding: stochastic` (the default) and `nearest`; naive bf16 (torch's AdamW on the
bf16 weights); and `bf16_compiled` (bf16, compiled blocks and loss: `compile: auto`'s choice). At
every held-out evaluation (each `--eval-every` steps and the last step) the ablation scores, on
the same held-out rows:
- `own`: the run's model as it trains (bf16 weights and bf16 compute for the bf16 runs);
- `master`: a bf16 run's fp32 master weights, evaluated in fp32: what the optimizer learned,
  before any rounding to bf16 and without bf16 compute;
- `nearest` / `stochastic`: those weights (fp32 run: its weights) rounded to bf16 to nearest or
  stochastically, evaluated in fp32: what a bf16 copy of them keeps (the forward's copy, final/).
`own` - `stochastic`/`nearest` is then the cost of bf16 compute, `nearest` - `master` the cost of
rounding the weights, `master` - fp32's `own` the cost in the updates themselves.
Prints the table and the relative gap of each run's `own` to fp32, and with --append writes it to
bench/RESULTS.md (figures + curves as JSON in bench/results/bf16_quality.json).
`--tiny` runs the same three with a 2-layer random model (SmolLM2's tokenizer): a quick check of
the script (`--tiny --steps 6 --eval-every 3 --rows 60 --lr 1e-3`), or a cheap curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/alpaca_en_demo.json")


def config_yaml(model: str, data: Path, out: Path, a: argparse.Namespace) -> str:
    return f"""model: {model}
output_dir: {out}
data:
  train:
    - path: {data}
      format: alpaca
      limit: {a.rows}
  max_length: {a.max_length}
  packing: true
  cache_dir: {out.parent / "cache"}
train:
  method: full
  lr: {a.lr}
  schedule: cosine
  warmup: 0.05
  batch_size: {a.batch}
  max_steps: {a.steps}
  seed: 42
eval:
  split: {a.eval_split}
  every: {a.eval_every}
"""


def tiny_model(d: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as safetensors (the --tiny check)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


RUNS = {  # name -> (train.precision, train.bf16_rounding, train.compile)
    "fp32": ("fp32", "stochastic", False), "bf16": ("bf16", "stochastic", False),
    "bf16_nearest": ("bf16", "nearest", False), "naive_bf16": ("bf16", "nearest", False),
    "bf16_compiled": ("bf16", "stochastic", True),  # what `compile: auto` does for bf16 runs of >= 50 steps on a CPU
}


def ablation(run: Any, optimizer: Any) -> dict[str, float]:
    """The held-out loss of ``run``'s model now, of its fp32 master weights, and of those weights
    rounded to bf16 to nearest and stochastically (each in fp32): see the module docstring."""
    import copy
    from dataclasses import replace

    import torch

    from sft.evaluation.heldout import heldout_loss
    from sft.lm.rounding import stochastic_round_
    from sft.training.optim import master_weights

    def score(model: Any, precision: str) -> float:
        loss = heldout_loss(model, run.eval_examples, run.pad_id, run.cfg, replace(run.rt, precision=precision))[0]
        if loss is None:
            raise SystemExit("no held-out tokens to score: raise --rows or --eval-split")
        return float(loss)

    row = {"own": score(run.module, run.rt.precision)}
    weights = copy.deepcopy(run.model).float()
    masters = master_weights(optimizer, run.model)
    params = dict(weights.named_parameters())
    with torch.no_grad():
        for name, m in masters.items():
            params[name].copy_(m)
    if masters:
        row["master"] = score(weights, "fp32")
    exact = {name: p.detach().clone() for name, p in params.items()}
    g = torch.Generator().manual_seed(7)
    for how in ("nearest", "stochastic"):
        with torch.no_grad():
            for name, p in params.items():
                low = exact[name].bfloat16() if how == "nearest" else stochastic_round_(
                    torch.empty_like(p, dtype=torch.bfloat16), exact[name], g)
                p.copy_(low.float())
        row[how] = score(weights, "fp32")
    return row


def run(name: str, cfg_text: str, out: Path) -> dict[str, Any]:
    import torch

    import sft.training.loop as loop
    import sft.training.prepare as prepare
    from sft.config import load_config
    from sft.training.loop import train

    cfg_path = out.parent / f"{name}.yaml"
    cfg_path.write_text(cfg_text)
    precision, rounding, compile_ = RUNS[name]
    cfg = load_config(cfg_path, [f"--train.precision={precision}", f"--train.bf16_rounding={rounding}",
                                 f"--train.compile={str(compile_).lower()}", "--eval.before_after=false"])
    seen: dict[str, Any] = {}
    scores: list[tuple[int, dict[str, float]]] = []
    originals = prepare.make_optimizer, loop.evaluate_during, loop.finish

    def make_optimizer(model: Any, c: Any) -> Any:
        if name == "naive_bf16":  # torch's AdamW straight on the bf16 weights: bf16 moments, no master
            seen["opt"] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=c.lr,
                                            betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps, weight_decay=c.weight_decay)
        else:
            seen["opt"] = originals[0](model, c)
        return seen["opt"]

    def evaluate_during(r: Any, log: Any, done: int) -> bool:
        scores.append((done, ablation(r, seen["opt"])))
        print(name, done, json.dumps(scores[-1][1]), flush=True)
        return bool(originals[1](r, log, done))

    def finish(r: Any, result: Any, progress: bool) -> None:
        scores.append((len(r.plan), ablation(r, seen["opt"])))
        print(name, len(r.plan), json.dumps(scores[-1][1]), flush=True)
        originals[2](r, result, progress)

    prepare.make_optimizer, loop.evaluate_during, loop.finish = make_optimizer, evaluate_during, finish  # type: ignore[assignment]
    t = time.perf_counter()
    try:
        train(cfg, overwrite=True, progress=False)
    finally:
        prepare.make_optimizer, loop.evaluate_during, loop.finish = originals  # type: ignore[assignment]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "run": name, "seconds": round(time.perf_counter() - t, 1), "load_1m_after": round(os.getloadavg()[0], 2),
        "train_loss": [r["loss"] for r in rows if "loss" in r], "scores": scores,
    }


def table(results: list[dict[str, Any]]) -> str:
    ref = {step: sc["own"] for step, sc in results[0]["scores"]}
    cols = ["own", "master", "nearest", "stochastic"]
    lines = ["| run | step | " + " | ".join(cols) + " | own vs fp32 | train loss, last 10 steps | s |",
             "|" + "---|" * (len(cols) + 5)]
    for r in results:
        last = r["train_loss"][-10:]
        for step, sc in r["scores"]:
            gap = (sc["own"] - ref[step]) / ref[step] if step in ref else float("nan")
            lines.append(f"| {r['run']} | {step} | " + " | ".join(f"{sc[c]:.4f}" if c in sc else "" for c in cols)
                         + f" | {gap * 100:+.3f}% | {sum(last) / len(last):.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--eval-split", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--tolerance", type=float, default=0.005, help="allowed relative eval-loss gap of bf16 to fp32")
    p.add_argument("--runs", default="fp32,bf16,bf16_nearest,naive_bf16", help=f"any of {', '.join(RUNS)}")
    p.add_argument("--tiny", action="store_true", help="a 2-layer random model instead of SmolLM2-135M")
    p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    work = Path(tempfile.mkdtemp(prefix="bf16q-"))
    model = "smollm2-135m-instruct"
    if a.tiny:
        model, a.max_length = tiny_model(work / "tiny"), 128
    results = []
    for name in a.runs.split(","):
        out = work / name
        results.append(run(name, config_yaml(model, DATA, out, a), out))
        print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(text)
    ev = {r["run"]: dict(r["scores"]).get(a.steps, {}).get("own", float("nan")) for r in results}
    ok = abs(ev["bf16"] - ev["fp32"]) / ev["fp32"] <= a.tolerance if {"bf16", "fp32"} <= ev.keys() else None
    print(f"bf16 final eval loss within {a.tolerance:.1%} of fp32: {ok}")
    if a.append:
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / f"bf16_quality{'_tiny' if a.tiny else ''}.json").write_text(json.dumps(
            {"args": vars(a), "results": results}, indent=1))
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n## bf16 quality (issue 21) {time.strftime('%Y-%m-%d %H:%M')}, "
                    f"{'tiny 2-layer random Llama' if a.tiny else 'SmolLM2-135M'}, {a.steps} steps\n\n"
                    f"`HF_HUB_OFFLINE=1 .venv/bin/python bench/bf16_quality.py {' '.join(sys.argv[1:])}`: "
                    f"{a.rows} alpaca rows ({a.eval_split:.0%} held out), packing, batch {a.batch} x "
                    f"{a.max_length}, lr {a.lr}, cosine. bf16 within {a.tolerance:.1%} of fp32: **{ok}**.\n\n"
                    f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
