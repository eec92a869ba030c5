"""Training quality of pure bf16 (bf16 weights + fp32 master weights) against fp32, and the
failure of a naive bf16 AdamW (bf16 weights and moments, no master copy).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bf16_quality.py [--steps 200] [--append]

Three `sft train` runs of SmolLM2-135M-Instruct on the same alpaca rows, plan and seed, differing
only in precision: fp32; bf16 (sft's `train.precision: bf16`); and naive bf16 (the same bf16
model, but torch's AdamW on the bf16 weights). Prints the held-out loss every `--eval-every`
steps and at the end, the relative gap of each bf16 run to fp32, and with --append writes the
table to bench/RESULTS.md (figures + curves as JSON in bench/results/bf16_quality.json).
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


def run(name: str, cfg_text: str, out: Path) -> dict[str, Any]:
    import torch

    import sft.training.prepare as prepare
    from sft.config import load_config
    from sft.training.loop import train

    cfg_path = out.parent / f"{name}.yaml"
    cfg_path.write_text(cfg_text)
    cfg = load_config(cfg_path, ["--train.precision=" + ("fp32" if name == "fp32" else "bf16")])
    original = prepare.make_optimizer
    if name == "naive_bf16":  # torch's AdamW straight on the bf16 weights: bf16 moments, no master
        prepare.make_optimizer = lambda model, c: torch.optim.AdamW(  # type: ignore[assignment]
            [p for p in model.parameters() if p.requires_grad], lr=c.lr, betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_eps, weight_decay=c.weight_decay)
    t = time.perf_counter()
    try:
        train(cfg, overwrite=True, progress=False)
    finally:
        prepare.make_optimizer = original
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "run": name, "seconds": round(time.perf_counter() - t, 1), "load_1m_after": round(os.getloadavg()[0], 2),
        "train_loss": [r["loss"] for r in rows if "loss" in r],
        "eval": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r],
    }


def table(results: list[dict[str, Any]]) -> str:
    ref = dict(results[0]["eval"])
    steps = [s for s, _ in results[0]["eval"]]
    head = "| run | " + " | ".join(f"eval @ {s}" for s in steps) + " | final vs fp32 | train loss, last 10 steps | s |"
    lines = [head, "|" + "---|" * (len(steps) + 4)]
    for r in results:
        ev = dict(r["eval"])
        gap = (ev.get(steps[-1], float("nan")) - ref[steps[-1]]) / ref[steps[-1]]
        last = r["train_loss"][-10:]
        lines.append(f"| {r['run']} | " + " | ".join(f"{ev.get(s, float('nan')):.4f}" for s in steps)
                     + f" | {gap * 100:+.2f}% | {sum(last) / len(last):.4f} | {r['seconds']:.0f} |")
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
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed relative eval-loss gap of bf16 to fp32")
    p.add_argument("--runs", default="fp32,bf16,naive_bf16")
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
    ev = {r["run"]: dict(r["eval"]).get(a.steps, float("nan")) for r in results}
    ok = abs(ev["bf16"] - ev["fp32"]) / ev["fp32"] <= a.tolerance if {"bf16", "fp32"} <= ev.keys() else None
    print(f"bf16 final eval loss within {a.tolerance:.0%} of fp32: {ok}")
    if a.append:
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / f"bf16_quality{'_tiny' if a.tiny else ''}.json").write_text(json.dumps(
            {"args": vars(a), "results": results}, indent=1))
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n## bf16 quality (issue 11) {time.strftime('%Y-%m-%d %H:%M')}, "
                    f"{'tiny 2-layer random Llama' if a.tiny else 'SmolLM2-135M'}, {a.steps} steps\n\n"
                    f"`HF_HUB_OFFLINE=1 .venv/bin/python bench/bf16_quality.py {' '.join(sys.argv[1:])}`: "
                    f"{a.rows} alpaca rows ({a.eval_split:.0%} held out), packing, batch {a.batch} x "
                    f"{a.max_length}, lr {a.lr}, cosine. bf16 within {a.tolerance:.0%} of fp32: **{ok}**.\n\n"
                    f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
