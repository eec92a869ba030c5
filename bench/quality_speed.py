"""Time and peak memory of ``sft data check`` (with its quality section) on 100,000 generated
conversations, and of the quality analysis alone (``sft.data.quality.find_problems``).

    .venv/bin/python bench/quality_speed.py [--rows 100000] [--eval-rows 1000] [--no-append]

The data: single-turn ``messages`` rows of random pseudo-words (2-6 sentences of 7-12 words per
reply, so shingles rarely repeat by chance) with 1% planted problems: near-duplicates, eval rows
copied from train, empty, cut-off and boilerplate replies. ``sft data check`` runs as a
subprocess, first with an empty tokenized-data cache (tokenizing everything, the quality analysis
included), then again from the cache; peak memory is the child's maximum resident set size.
Prints a table and appends it, with machine and date, to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "RESULTS.md"
SFT = str(Path(sys.executable).parent / "sft")


def words(rng: random.Random, n: int = 5000) -> list[str]:
    syl = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "qui", "dan", "po", "ny", "ber", "ho", "zi", "ma",
           "tel", "gra", "fu", "wen"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syl) for _ in range(rng.randint(2, 3))))
    return sorted(out)


def generate(folder: Path, rows: int, eval_rows: int, seed: int = 0) -> dict[str, int]:
    """train.jsonl and eval.jsonl in ``folder``; returns how many problems of each kind were planted."""
    rng = random.Random(seed)
    vocab = words(rng)

    def sentence(end: str = ".") -> str:
        return " ".join(rng.sample(vocab, rng.randint(7, 12))).capitalize() + end

    def row(prompt: str | None = None, reply: str | None = None) -> dict:
        reply = reply or " ".join(sentence() for _ in range(rng.randint(2, 6)))
        return {"messages": [{"role": "user", "content": prompt or sentence("?")},
                             {"role": "assistant", "content": reply}]}

    planted = {"near_duplicates": 0, "empty_responses": 0, "truncated_responses": 0, "boilerplate": 0}
    train: list[dict] = []
    for i in range(rows):
        pick = i % 100
        if pick == 10 and train:  # a near-duplicate: one word of an earlier long reply changed (similarity > 0.8)
            src = rng.choice([r for r in train[-50:] if len(r["messages"][1]["content"].split()) >= 40] or train)["messages"]
            w = src[1]["content"].split()
            w[len(w) // 2] = "changed"
            train.append({"messages": [src[0], {"role": "assistant", "content": " ".join(w)}]})
            planted["near_duplicates"] += 1
        elif pick == 20:
            train.append(row(reply="N/A"))
            planted["empty_responses"] += 1
        elif pick == 30:
            train.append(row(reply=sentence() + " and then the"))
            planted["truncated_responses"] += 1
        elif pick == 40:
            train.append(row(reply="As an AI language model, I cannot say. " + sentence()))
            planted["boilerplate"] += 1
        else:
            train.append(row())
    ev = [row() for _ in range(eval_rows)]
    for k in range(0, eval_rows, 50):  # 2% of eval rows copied from train
        ev[k] = row(reply=train[(k * 97) % rows]["messages"][1]["content"])
    planted["contamination"] = len(range(0, eval_rows, 50))
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    return planted


def run_check(config: Path) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS GB of the child, the JSON) of `sft data check CONFIG --json`."""
    t = time.perf_counter()
    proc = subprocess.run([SFT, "data", "check", str(config), "--json"], capture_output=True, text=True, check=False)
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"sft data check failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KiB -> GB (max over children so far)
    return secs, rss, json.loads(proc.stdout)


def inner(config: str) -> None:
    """Child process: read the rows, then time find_problems alone; prints a JSON line. Works
    against older sft code too (``PYTHONPATH=<old checkout>/src``), for before/after figures."""
    from sft.config import load_config
    from sft.data.pipeline import collect_conversations
    from sft.data.quality import find_problems

    cfg = load_config(config)
    t = time.perf_counter()
    train, _ = collect_conversations(cfg, "train")
    ev, _ = collect_conversations(cfg, "eval") if cfg.eval.data else ([], None)
    read = time.perf_counter() - t
    rss_read = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t = time.perf_counter()
    found = find_problems(train, ev)
    quality = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps({"rows": len(train), "eval_rows": len(ev), "read_s": read, "quality_s": quality,
                      "rss_read_gb": rss_read, "rss_gb": rss, "counts": {k: len(v) for k, v in found.items()}}))


def inner_cached(config: str) -> None:
    """Child process: the quality stage as ``sft data check`` runs it (``find_problems_cached``,
    per-source facts under an empty cache folder), then again after one row is appended to the
    second of the config's train files, then again unchanged; prints a JSON line."""
    import shutil

    from sft.config import load_config
    from sft.data.pipeline import _collect, collect_conversations
    from sft.data.quality import QualitySettings
    from sft.data.quality_cache import find_problems_cached

    cfg = load_config(config)
    root = Path(config).parent / "quality-cache"
    shutil.rmtree(root, ignore_errors=True)
    out: dict = {}
    for step in ("cold", "one file edited", "warm"):
        if step == "one file edited":
            path = Path(cfg.data.train[min(1, len(cfg.data.train) - 1)].path)
            path = path if path.is_absolute() else Path(config).parent / path
            with path.open("a") as f:
                f.write(json.dumps({"messages": [{"role": "user", "content": "One more question?"},
                                                 {"role": "assistant", "content": "One more answer."}]}) + "\n")
        train, _, raw = _collect(cfg, "train")
        ev = collect_conversations(cfg, "eval")[0] if cfg.eval.data else []
        t = time.perf_counter()
        found = find_problems_cached(cfg, train, ev, QualitySettings(), None, None, raw, root)
        out[step] = {"quality_s": time.perf_counter() - t, "counts": {k: len(v) for k, v in found.items()}}
    out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out["rows"] = len(train)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--eval-rows", type=int, default=1_000)
    ap.add_argument("--no-append", action="store_true", help="print only; do not append to bench/RESULTS.md")
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    ap.add_argument("--inner-cached", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args.inner)
        return
    if args.inner_cached:
        inner_cached(args.inner_cached)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        planted = generate(folder, args.rows, args.eval_rows)
        config = folder / "c.yaml"
        config.write_text(
            "model: smollm2-135m-instruct\n"
            f"data:\n  train: [train.jsonl]\n  max_length: 1024\n  cache_dir: {folder / 'cache'}\n"
            "eval:\n  data: [eval.jsonl]\n"
        )
        load = os.getloadavg()[0]
        cold, cold_rss, report = run_check(config)
        warm, _, again = run_check(config)
        proc = subprocess.run([sys.executable, __file__, "--inner", str(config)], capture_output=True, text=True,
                              check=True)
        alone = json.loads(proc.stdout)
        load = max(load, os.getloadavg()[0])
    counts = {k: len(v) for k, v in report["quality"].items()}
    lines = [
        f"## quality_speed (sft data check, smollm2-135m-instruct tokenizer) "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()} / {platform.machine()} / {os.cpu_count()} CPUs",
        "",
        f"Command: `.venv/bin/python bench/quality_speed.py --rows {args.rows} --eval-rows {args.eval_rows}` "
        f"({args.rows} train + {args.eval_rows} eval conversations, {report['total_tokens']} train tokens)",
        "",
        "| what | seconds | peak RSS |",
        "|---|---|---|",
        f"| `sft data check --json`, empty cache (read, tokenize, quality) | {cold:.1f} | {cold_rss:.2f} GB |",
        f"| `sft data check --json` again ({'from the cache' if again['cached'] else 'cache MISSED: sft code changed meanwhile'}) "
        f"| {warm:.1f} | - |",
        f"| reading the rows (train + eval), in-process | {alone['read_s']:.1f} | - |",
        f"| `find_problems` alone (all kinds) | {alone['quality_s']:.1f} | {alone['rss_gb']:.2f} GB (whole process) |",
        "",
        f"Planted: {json.dumps(planted)}; found: {json.dumps(counts)} (copies of planted rows count again; "
        "a near-duplicate copy of a short reply can fall below 0.8)",
        f"Load average (1 min) up to {load:.1f} on {os.cpu_count()} CPUs while it ran: figures are upper bounds on an idle machine.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
