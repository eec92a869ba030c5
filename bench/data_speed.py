"""Conversations per second of ``build_dataset`` (cache off): a real Alpaca file and generated
multi-turn sets (time per turn should stay flat: encoding is linear in the turns).

    .venv/bin/python bench/data_speed.py [--data /work/shared/data/alpaca_en_demo.json] [--turns 2 8 32 128]

If ``trl`` is importable, TRL's preprocessing of the same file is timed too (it is not a project
dependency; e.g. ``python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl``
then run this script with that interpreter and ``PYTHONPATH=src``).
Prints a table and appends it, with machine and date, to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sft.config import Config, DataConfig, SourceConfig
from sft.data.pipeline import build_dataset
from sft.models.load import load_tokenizer

RESULTS = Path(__file__).parent / "RESULTS.md"


def time_build(path: str, tokenizer: Any, model: str, repeats: int) -> tuple[int, int, float]:
    """(conversations, tokens, best seconds) of build_dataset with the cache off."""
    cfg = Config(model=model, data=DataConfig(train=[SourceConfig(path)], max_length=1 << 20))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        ds = build_dataset(cfg, tokenizer, use_cache=False)
        best = min(best, time.perf_counter() - t)
    return len(ds.examples), ds.report.total_tokens, best


def multi_turn(path: Path, turns: int, rows: int) -> None:
    """``rows`` conversations of ``turns`` user/assistant pairs of ~25 words each."""
    with path.open("w") as f:
        for r in range(rows):
            msgs = []
            for t in range(turns):
                msgs.append({"role": "user", "content": f"Question {r}.{t}: " + "what about the weather " * 5})
                msgs.append({"role": "assistant", "content": f"Answer {r}.{t}: " + "it is sunny and warm " * 5})
            f.write(json.dumps({"messages": msgs}) + "\n")


def time_trl(path: str, tokenizer: Any) -> tuple[int, float] | None:
    if importlib.util.find_spec("trl") is None:
        return None
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer  # noqa: F401  (import cost is not timed below)

    rows = json.loads(Path(path).read_text())
    convs = [{"messages": [{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                           {"role": "assistant", "content": r["output"]}]} for r in rows]
    tmp = Path(tempfile.mkdtemp()) / "m.jsonl"
    tmp.write_text("".join(json.dumps(c) + "\n" for c in convs))
    ds = load_dataset("json", data_files=str(tmp), split="train")
    t = time.perf_counter()
    # what SFTTrainer does for conversational data with assistant_only_loss: template + mask per row
    ds.map(lambda ex: tokenizer.apply_chat_template(ex["messages"], return_dict=True, tokenize=True),
           remove_columns=["messages"])
    return len(ds), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/alpaca_en_demo.json")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--turns", type=int, nargs="+", default=[2, 8, 32, 128])
    ap.add_argument("--rows", type=int, default=50, help="conversations per multi-turn set")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    table = ["| set | conversations | tokens | seconds | conv/s | ms per turn |", "|---|---|---|---|---|---|"]

    def row(name: str, n: int, tokens: int | str, secs: float, turns: int) -> None:
        line = f"| {name} | {n} | {tokens} | {secs:.2f} | {n / secs:.0f} | {1000 * secs / (n * turns):.2f} |"
        table.append(line)
        print(line, flush=True)

    print("\n".join(table))
    if Path(args.data).is_file():
        n, tokens, secs = time_build(args.data, tok, args.model, args.repeats)
        row(f"sft build_dataset: {Path(args.data).name}", n, tokens, secs, 1)
        trl = time_trl(args.data, tok)
        if trl is not None:
            row(f"trl-style apply_chat_template map: {Path(args.data).name}", trl[0], "-", trl[1], 1)
    with tempfile.TemporaryDirectory() as d:
        for turns in args.turns:
            p = Path(d) / f"turns{turns}.jsonl"
            multi_turn(p, turns, args.rows)
            n, tokens, secs = time_build(str(p), tok, args.model, args.repeats)
            row(f"sft build_dataset: {turns}-turn generated", n, tokens, secs, turns)

    machine = f"{platform.node()} / {platform.processor() or platform.machine()} / {os.cpu_count()} CPUs"
    header = "# Benchmark results\n\nAppended by the scripts in bench/. Newest last.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text += f"\n## data_speed ({args.model}, cache off) {stamp}, {machine}\n\n" + "\n".join(table) + "\n"
    RESULTS.write_text(text)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
