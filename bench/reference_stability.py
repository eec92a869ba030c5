"""How many reference tokens does the forgetting perplexity need to be stable to 1%?

Scores every REFERENCE_WINDOW-token window of the shipped reference text
(``sft.evaluation.reference``, ``stdlib-prose-v1``) with a model, once, and keeps each window's
summed NLL. "Stable" is then measured without re-running the model: for a budget of k windows,
seed s picks k windows at random (without replacement) and the perplexity over them is
exp(sum NLL / tokens); for seeds 0..19 we report the largest relative gap between seed 0 and any
other seed, and the spread (max/min - 1) over all 20. With ``--tuned DIR`` (a fine-tuned copy of
``--model``) the same is reported for the forgetting ratio ppl(tuned) / ppl(model) on the same
windows, which is what `sft sweep`'s budget and the README's forgetting row use.

    .venv/bin/python bench/reference_stability.py [--model smollm2-135m-instruct] [--tuned runs/x/final] [--threads 1]

Writes bench/results/reference_stability_<model>.json (per-window NLLs and the table) and prints
the table; the figures in bench/RESULTS.md name this command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

from sft.evaluation.evaluate import REFERENCE_WINDOW
from sft.evaluation.reference import load_reference
from sft.models.load import load_model, load_tokenizer

OUT = Path(__file__).parent / "results"


def window_nlls(model_name: str) -> tuple[list[float], list[int], str, float]:
    """Summed NLL and scored-token count of every full window, the reference version, seconds."""
    ref = load_reference(None)
    tok = load_tokenizer(model_name)
    model = load_model(model_name, torch.float32).eval()
    ids = tok(ref.text, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    nll, count = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(ids) - REFERENCE_WINDOW + 1, REFERENCE_WINDOW):
            x = torch.tensor([bos + ids[s : s + REFERENCE_WINDOW]])
            logp = F.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1].float(), dim=-1)
            nll.append(-float(logp.gather(1, x[0, 1:, None]).sum()))
            count.append(x.shape[1] - 1)
    return nll, count, ref.version, time.perf_counter() - t0


def spread(nll: list[float], count: list[int], k: int, seeds: int = 20) -> tuple[float, float]:
    """(max |ppl_s / ppl_0 - 1| over seeds s, max/min - 1 over all seeds) for k random windows.
    ``nll`` may be a difference of two models' NLLs: the "perplexity" is then their ratio."""
    ppls = []
    for s in range(seeds):
        pick = random.Random(s).sample(range(len(nll)), k)
        ppls.append(math.exp(sum(nll[i] for i in pick) / sum(count[i] for i in pick)))
    return max(abs(p / ppls[0] - 1) for p in ppls), max(ppls) / min(ppls) - 1


def table(nll: list[float], count: list[int]) -> list[dict[str, float]]:
    rows = []
    k = 4
    while k < len(nll):
        gap, spr = spread(nll, count, k)
        rows.append({"windows": k, "tokens": k * REFERENCE_WINDOW, "max_gap_to_seed0": round(gap, 4),
                     "spread_20_seeds": round(spr, 4)})
        k *= 2
    return rows


def print_table(title: str, rows: list[dict[str, float]]) -> None:
    print(f"\n{title}\n| windows | tokens | max gap to seed 0 (20 seeds) | spread max/min - 1 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['windows']} | {r['tokens']} | {r['max_gap_to_seed0']:.2%} | {r['spread_20_seeds']:.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tuned", default=None, help="a fine-tuned copy of --model: also measure the ratio")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nll, count, version, secs = window_nlls(args.model)
    full = math.exp(sum(nll) / sum(count))
    result = {"model": args.model, "reference": version, "window": REFERENCE_WINDOW, "windows": len(nll),
              "tokens": sum(count), "perplexity_all": round(full, 3), "seconds": round(secs, 1),
              "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "table": table(nll, count), "window_nll": [round(x, 4) for x in nll], "window_tokens": count}
    print(f"{args.model} on {version}: {len(nll)} windows, {sum(count)} tokens, ppl {full:.3f}, {secs:.0f} s")
    print_table(f"perplexity of {args.model}", result["table"])
    if args.tuned:
        tuned, _, _, _ = window_nlls(args.tuned)
        diff = [t - b for t, b in zip(tuned, nll)]
        ratio = math.exp(sum(diff) / sum(count))
        result.update(tuned=args.tuned, ratio_all=round(ratio, 4), ratio_table=table(diff, count),
                      tuned_window_nll=[round(x, 4) for x in tuned])
        print(f"ratio ppl(tuned) / ppl(base) over all windows: {ratio:.4f}")
        print_table("forgetting ratio ppl(tuned) / ppl(base)", result["ratio_table"])
    OUT.mkdir(exist_ok=True)
    dst = OUT / f"reference_stability_{args.model}{'_tuned' if args.tuned else ''}.json"
    dst.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
