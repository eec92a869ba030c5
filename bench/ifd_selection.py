"""Do the model's scores find bad rows, and does training on the IFD selection help?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ifd_selection.py [--good 144 --planted 8 --heldout 64] [--append]

1. Plant bad rows among good alpaca rows (/work/shared/data/alpaca_en_demo.json, short rows only,
   so it runs on a CPU): ``--planted`` mismatched pairs (replies rotated between prompts) and
   ``--planted`` replies cut mid-word. Score them with ``sft data score`` (SmolLM2-135M-Instruct,
   sft.evaluation.scoring.compute_scores) and report the recall at the worst 10%: the share of the
   mismatched rows among the 10% highest IFD, and of the cut rows among the 10% lowest
   end-of-turn probability.
2. Train SmolLM2-135M-Instruct the same ``--steps`` (batch 4, seed 0; 9 steps = one epoch of a
   selection) on all rows, on ``data.select: {by: ifd, keep: 0.3, drop_ifd_above: 1.0}`` and on a
   random selection of the same size (``by: random``), then
   compare the loss of held-out good rows (per token over their trained reply tokens), with 95%
   bootstrap intervals and paired differences to "all" (sft.evaluation.stats).
``--append`` adds the tables to bench/RESULTS.md and the figures to bench/results/ifd_selection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/alpaca_en_demo.json")
MODEL = "smollm2-135m-instruct"


def cut_mid_word(text: str, rng: random.Random) -> str | None:
    """The reply cut inside a word of 5+ letters in its second half ("... Jupiter, Sat").

    >>> cut_mid_word("one two three Saturn Jupiter", random.Random(0))
    'one two three Saturn Jup'
    """
    words = [m for m in re.finditer(r"[A-Za-z]{5,}", text) if m.start() > len(text) // 2]
    if not words:
        return None
    w = rng.choice(words)
    return text[: w.start() + len(w.group()) // 2]


def plant(rows: list[dict[str, Any]], good: int, planted: int, heldout: int, seed: int) -> dict[str, Any]:
    """(train rows with planted ones, their kinds by record number, held-out good rows)."""
    rng = random.Random(seed)
    rows = rows[:]
    rng.shuffle(rows)
    cut_src = [r for r in rows if cut_mid_word(r["output"], rng)][:planted]
    rest = [r for r in rows if r not in cut_src]
    mis_src, rest = rest[:planted], rest[planted:]
    train, held = rest[:good], rest[good : good + heldout]
    mismatched = [{**r, "output": mis_src[(i + 1) % planted]["output"]} for i, r in enumerate(mis_src)]
    cut = [{**r, "output": cut_mid_word(r["output"], rng)} for r in cut_src]
    tagged = [(r, "good") for r in train] + [(r, "mismatched") for r in mismatched] + [(r, "cut") for r in cut]
    rng.shuffle(tagged)
    return {"train": [r for r, _ in tagged], "kind": {i + 1: k for i, (_, k) in enumerate(tagged)}, "heldout": held}


def config_yaml(data: Path, out: Path, a: argparse.Namespace, select: str = "") -> str:
    return f"""model: {MODEL}
output_dir: {out}
data:
  train: [{{path: {data}, format: alpaca}}]
  max_length: {a.max_length}
  packing: false
  cache_dir: {a.work / "cache"}
{select}train:
  lr: {a.lr}
  max_steps: {a.steps}
  batch_size: 4
  warmup: 0.1
  seed: 0
  log_every: 5
"""


def recall(scores: list[dict[str, Any]], kind: dict[int, str], key: str, worst_high: bool, target: str) -> dict[str, Any]:
    """How many rows of ``target`` kind are among the worst 10% by ``key``."""
    ranked = sorted((s for s in scores if s[key] is not None), key=lambda s: s[key], reverse=worst_high)
    n = max(1, round(0.1 * len(ranked)))
    found = sum(1 for s in ranked[:n] if kind[s["line"]] == target)
    total = sum(1 for k in kind.values() if k == target)
    return {"worst": n, "found": found, "of": total, "recall": found / total if total else None}


def heldout_losses(model_dir: str, held_cfg: Any, tok: Any) -> list[tuple[float, int]]:
    """(NLL sum, tokens) over the trained tokens (reply + end of turn) of each held-out row."""
    import torch

    from sft.data.pipeline import build_dataset
    from sft.data.types import IGNORE
    from sft.evaluation.scoring import Job, token_logprobs
    from sft.models.load import load_model

    examples = build_dataset(held_cfg, tok).examples
    model = load_model(model_dir, dtype=torch.float32).eval()
    jobs = [Job(ex.input_ids, [t for t, lab in enumerate(ex.labels) if lab != IGNORE]) for ex in examples]
    token_logprobs(model, jobs, torch.device("cpu"))
    return [(-sum(j.out), len(j.out)) for j in jobs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--good", type=int, default=100)
    p.add_argument("--planted", type=int, default=5, help="mismatched rows, and as many cut rows")
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--max-length", type=int, default=128, help="rows longer than this are left out")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=9, help="optimizer steps of every arm (batch 4): the same compute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--append", action="store_true")
    a = p.parse_args()
    a.work = a.work or Path(tempfile.mkdtemp(prefix="ifd-bench-"))
    sys.path.insert(0, str(ROOT / "src"))
    from sft.config import load_config
    from sft.data.pipeline import build_dataset
    from sft.evaluation import stats
    from sft.evaluation.scoring import compute_scores
    from sft.models.load import load_tokenizer
    from sft.training.loop import train

    tok = load_tokenizer(MODEL)
    def length(r: dict[str, Any]) -> int:  # about what the pipeline makes of it (a margin of 8 tokens below)
        chat = [{"role": "user", "content": f"{r['instruction']}\n{r['input']}"}, {"role": "assistant", "content": r["output"]}]
        return len(tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"])

    rows = [r for r in json.loads(DATA.read_text()) if length(r) + 8 <= a.max_length]
    setup = plant(rows, a.good, a.planted, a.heldout, a.seed)
    a.work.mkdir(parents=True, exist_ok=True)
    train_path, held_path = a.work / "train.jsonl", a.work / "heldout.jsonl"  # JSONL: a row's line is its number
    for path, part in ((train_path, setup["train"]), (held_path, setup["heldout"])):
        text = "".join(json.dumps(r) + "\n" for r in part)
        if not path.exists() or path.read_text() != text:  # same file, same mtime: a rerun reuses the cached scores
            path.write_text(text)
    base = a.work / "all.yaml"
    base.write_text(config_yaml(train_path, a.work / "runs/all", a))
    t0 = time.time()
    _, scores = compute_scores(load_config(str(base)))
    score_s = time.time() - t0
    kind = setup["kind"]
    found = {"mismatched_by_ifd": recall(scores, kind, "ifd", True, "mismatched"),
             "cut_by_eot_prob": recall(scores, kind, "eot_prob", False, "cut"),
             "mismatched_by_eot_prob": recall(scores, kind, "eot_prob", False, "mismatched"),
             "cut_by_ifd": recall(scores, kind, "ifd", True, "cut")}
    mean = {k: {f: sum(s[f] for s in scores if kind[s["line"]] == k) / max(1, sum(kind[s["line"]] == k for s in scores))
                for f in ("ifd", "eot_prob")} for k in ("good", "mismatched", "cut")}
    print(json.dumps({"recall": found, "means": mean}, indent=1))

    n_rows = len(setup["train"])
    keep = round(a.keep * n_rows)
    arms = {"all": "", "ifd": f"  select: {{by: ifd, keep: {keep}, drop_ifd_above: 1.0}}\n",
            "random": f"  select: {{by: random, keep: {keep}}}\n"}
    held_cfg = load_config(None, [f"--data.train=[{{path: {held_path}, format: alpaca}}]",
                                  f"--data.max_length={a.max_length}", f"--data.cache_dir={a.work / 'cache'}"])
    runs: dict[str, Any] = {}
    losses: dict[str, list[tuple[float, int]]] = {"base": heldout_losses(MODEL, held_cfg, tok)}
    for arm, select in arms.items():
        cfg_path = a.work / f"{arm}.yaml"
        cfg_path.write_text(config_yaml(train_path, a.work / f"runs/{arm}", a, select))
        cfg = load_config(str(cfg_path))
        selected = build_dataset(cfg, tok).report
        t = time.time()
        done = a.work / f"runs/{arm}/run_state.json"
        if not (done.exists() and json.loads(done.read_text()).get("status") == "finished"):  # a rerun reuses it
            train(cfg, overwrite=True, progress=False)
        steps = json.loads(done.read_text())["steps"]
        runs[arm] = {"steps": steps, "seconds": round(time.time() - t), "rows": selected.examples,
                     "select": selected.select}
        print(f"{arm}: {selected.examples} rows, {steps} steps, {runs[arm]['seconds']} s", flush=True)
        losses[arm] = heldout_losses(str(a.work / f"runs/{arm}/final"), held_cfg, tok)
    table = []
    for arm, ls in losses.items():
        nums, dens = [x for x, _ in ls], [n for _, n in ls]
        loss = stats.ratio(nums, dens)(list(range(len(ls))))
        ci = stats.bootstrap(stats.ratio(nums, dens), len(ls))
        row = {"arm": arm, "loss": loss, "ci": ci, **runs.get(arm, {})}
        if arm not in ("base", "all"):
            ref = losses["all"]
            row["vs_all"] = stats.paired(stats.ratio([x for x, _ in ref], [n for _, n in ref]), stats.ratio(nums, dens), len(ls))
        table.append(row)
    print(json.dumps(table, indent=1, default=str))
    if a.append:
        write_results(a, found, mean, table, score_s, len(scores), n_rows)
    return 0


def write_results(a: argparse.Namespace, found: dict[str, Any], mean: dict[str, Any], table: list[dict[str, Any]],
                  score_s: float, replies: int, n_rows: int) -> None:
    import torch

    load = os.getloadavg()
    cpu = next((line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = [f"\n## ifd_selection (issue 24) {time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} CPUs, "
             f"load {load[0]:.1f}, torch {torch.__version__}; shared machine",
             "", f"`python bench/ifd_selection.py --good {a.good} --planted {a.planted} --heldout {a.heldout} "
             f"--max-length {a.max_length} --lr {a.lr} --keep {a.keep} --append`: {n_rows} alpaca rows "
             f"({a.good} good, {a.planted} replies rotated between prompts, {a.planted} replies cut mid-word), "
             f"scored by {MODEL} ({replies} replies in {score_s:.0f} s).", "",
             "| planted | found by | in the worst 10% | recall |", "|---|---|---|---|"]
    for k, r in found.items():
        what, by = k.split("_by_")
        lines.append(f"| {what} | {by} | {r['found']} of {r['of']} (worst {r['worst']}) | {r['recall']:.0%} |")
    lines += ["", "| rows | mean IFD | mean end-of-turn prob |", "|---|---|---|"]
    lines += [f"| {k} | {v['ifd']:.3f} | {v['eot_prob']:.3f} |" for k, v in mean.items()]
    lines += ["", f"{a.steps} steps of full fine-tuning ({MODEL}, lr {a.lr}, batch 4, seed 0) on each set; held-out: "
              f"{a.heldout} good rows never trained on, loss per trained token (reply + end of turn), 95% "
              "bootstrap interval; difference to `all` by paired bootstrap over the same held-out rows "
              "(sft.evaluation.stats).", "",
              "| trained on | rows kept | steps | held-out loss | 95% CI | minus `all` (95% CI, p) |", "|---|---|---|---|---|---|"]
    for r in table:
        ci = f"{r['ci'][0]:.4f} - {r['ci'][1]:.4f}" if r.get("ci") else "-"
        kept = r.get("rows", "-")
        vs = "-"
        if "vs_all" in r:
            d, dci, pv = r["vs_all"]
            vs = f"{d:+.4f} ({dci[0]:+.4f} to {dci[1]:+.4f}, p {pv:.3f})"
        name = "nothing (the base model)" if r["arm"] == "base" else r["arm"]
        lines.append(f"| {name} | {kept} | {r.get('steps', '-')} | {r['loss']:.4f} | {ci} | {vs} |")
    with (ROOT / "bench/RESULTS.md").open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    out = ROOT / "bench/results/ifd_selection.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"recall": found, "means": mean, "training": table}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
