"""Data at scale: N generated multi-turn conversations through ``sft data check``/``tokenize``, with
TRL's preparation and the floor (render + batch-encode) side by side in the same run.

    .venv/bin/python bench/data_scale.py --n 100000 [--trl-python /tmp/trl-venv/bin/python] [--dir /tmp/data_scale]

Every stage runs as its own process; its peak memory is sampled as the PSS of the process and its
workers summed (shared pages counted once). Stages: ``sft data check`` from a cold cache; again after editing one
of the three source files (only that file is re-tokenized); again warm; ``sft data tokenize`` from a
cold cache; sft's tokenizing+masking alone (``encode_source`` over the read conversations); the
floor; TRL's ``SFTTrainer`` dataset preparation (``dataset_num_proc`` = usable cores, in a venv
with trl: ``python3 -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install torch==2.13.0
--index-url https://download.pytorch.org/whl/cpu && /tmp/trl-venv/bin/pip install trl``).
Prints a table and appends it, with ``uptime``, CPU and date, to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "RESULTS.md"
WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "for", "on", "with", "as", "was", "be", "this", "have", "are", "or", "by", "not", "but", "what", "all", "can", "data", "model", "train", "token", "loss", "step", "batch", "learn", "rate", "value", "change", "number", "result", "method", "test", "python", "code", "function", "return", "list", "string", "file", "error", "check", "run", "fast", "slow", "memory", "disk", "cache", "read", "write", "order", "system", "user", "answer", "question", "explain", "example", "simple", "because", "first", "second", "last"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly and precisely.", "You are an expert programmer."]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def conversation(rng: random.Random, i: int) -> dict[str, Any]:
    """1-3 turns, a system prompt in 30% of rows, replies of 10-110 words (~160 tokens a row)."""
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    for t in range(rng.choice((1, 1, 2, 3))):
        msgs.append({"role": "user", "content": f"Q{i}.{t}: " + sentence(rng, rng.randint(5, 30))})
        msgs.append({"role": "assistant", "content": sentence(rng, rng.randint(10, 110))})
    return {"messages": msgs}


def generate(n: int, folder: Path, seed: int = 0, fmt: str = "jsonl") -> list[Path]:
    """``n`` conversations in three files (a, b, c) of format ``fmt`` (``jsonl``, ``json``: a JSON
    array, ``parquet``), the same rows for the same n and seed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = [folder / f"{k}.{fmt}" for k in "abc"]
    if fmt == "jsonl":
        files = [p.open("w") for p in paths]
        for i in range(n):
            files[i % 3].write(json.dumps(conversation(rng, i)) + "\n")
        for f in files:
            f.close()
        return paths
    parts: list[list[dict[str, Any]]] = [[], [], []]
    for i in range(n):
        parts[i % 3].append(conversation(rng, i))
    for path, rows in zip(paths, parts):
        if fmt == "json":
            path.write_text(json.dumps(rows))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
    return paths


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and its workers, summed: pages that forked workers share
    with their parent count once (summed RSS would count them in every process)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return sum(q.memory_full_info().pss for q in [p, *p.children(recursive=True)])
    except psutil.Error:
        return 0


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak PSS of its process tree (sampled every 100 ms) and its stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    secs = time.perf_counter() - t
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    return {"seconds": secs, "peak_pss_mb": peak[0] / 2**20, "stdout": out}


def write_config(folder: Path, paths: list[Path], model: str, num_proc: str) -> Path:
    cfg = folder / "config.yaml"
    files = ", ".join(str(p) for p in paths)
    cfg.write_text(f"model: {model}\ndata:\n  train: [{files}]\n  cache_dir: {folder / 'cache'}\n"
                   f"  max_length: 2048\n  num_proc: {num_proc}\n")
    return cfg


def train_rss(cfg: Path, out: Path, steps: int = 10) -> dict[str, Any]:
    """``sft train`` for ``steps`` steps on a warm data cache: seconds from launch to the first
    step's row in metrics.jsonl, PSS of the process tree when the ``steps``-th row appears, and the
    peak (sampled every 100 ms)."""
    cmd = [sys.executable, "-m", "sft", "train", str(cfg), f"--train.max_steps={steps}", f"--output_dir={out}",
           "--overwrite", "--train.compile=false", "--train.batch_size=1", "--train.grad_accum=1"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first = at_step = None
    peak = 0
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        pss = tree_pss(proc.pid)
        peak = max(peak, pss)
        rows = metrics.read_text().count('"step"') if metrics.exists() else 0
        if rows and first is None:
            first = time.perf_counter() - t
        if rows >= steps and at_step is None:
            at_step = pss
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    return {"first_step_s": first, "pss_at_step_mb": (at_step or 0) / 2**20, "peak_pss_mb": peak / 2**20,
            "seconds": time.perf_counter() - t}


def stage_encode(cfg_path: str) -> None:
    """sft's tokenizing + masking alone, over conversations already read (prints JSON)."""
    from sft.config import load_config
    from sft.data.chat import resolve_template
    from sft.data.pipeline import _collect
    from sft.data.source_cache import Encoding, encode_source
    from sft.models.load import load_tokenizer

    cfg = load_config(cfg_path)
    tok = load_tokenizer(cfg.model)
    template = resolve_template(cfg.data.template, tok)
    _, _, raw = _collect(cfg, "train")
    d = cfg.data
    enc = Encoding(tok, template, d.train_on, d.reasoning, d.max_length, d.truncation)
    t = time.perf_counter()
    n = tokens = 0
    for _, convs in raw:
        store = encode_source(convs, enc, None, d.num_proc)
        n += len(convs)
        tokens += int(store.lengths.sum())
    print(json.dumps({"conversations": n, "tokens": tokens, "seconds": time.perf_counter() - t}))


def read_rows(paths: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for p in paths for line in open(p)]


def stage_floor(tokenizer_dir: str, paths: list[str]) -> None:
    """Render every conversation with the template, then batch-encode (no masks): the floor."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = read_rows(paths)
    t = time.perf_counter()
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    tokens = 0
    for k in range(0, len(texts), 1000):
        tokens += sum(len(x) for x in tok(texts[k : k + 1000], add_special_tokens=False)["input_ids"])
    print(json.dumps({"conversations": len(rows), "tokens": tokens, "seconds": time.perf_counter() - t}))


def stage_trl(model_dir: str, tokenizer_dir: str, paths: list[str], procs: int) -> None:
    """TRL's own preparation: SFTTrainer's dataset map (dataset_num_proc = procs); model load not timed."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=paths, split="train", cache_dir=str(Path(paths[0]).parent / "hf"))
    t = time.perf_counter()
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds,
                         args=SFTConfig(output_dir=str(Path(paths[0]).parent / "trl-out"), report_to=[],
                                        max_length=2048, dataset_num_proc=procs, bf16=False, packing=False))
    n = len(trainer.train_dataset)
    print(json.dumps({"conversations": n, "seconds": time.perf_counter() - t}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dir", default="/tmp/data_scale")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--num-proc", default="auto")
    ap.add_argument("--trl-python", default=None, help="a python with trl installed (skipped when absent)")
    ap.add_argument("--only", default="check,edit,warm,tokenize,encode,floor,trl",
                    help="stages to run, comma-separated (without check, the data check still runs, unmeasured, "
                         "for the counts; with --reuse it then keeps the earlier run's cache: e.g. --only none --train-vs N)")
    ap.add_argument("--train-vs", type=int, default=0, metavar="N_SMALL",
                    help="also train 10 steps over --n and over N_SMALL conversations (warm caches): RSS at step 10 "
                         "and seconds to the first step, side by side")
    ap.add_argument("--format", default="jsonl", choices=("jsonl", "json", "parquet"),
                    help="the files' format: JSON Lines, a JSON array each, or Parquet (the same rows)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the generated files of an earlier run in --dir (same n; without --only edit); caches are cleared")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage == "encode":
        return stage_encode(args.rest[0])
    if args.stage == "floor":
        return stage_floor(args.rest[0], args.rest[1:])
    if args.stage == "trl":
        return stage_trl(args.rest[0], args.rest[1], args.rest[2:], int(args.num_proc))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sft.data.source_cache import usable_cores
    from sft.models.load import load_tokenizer

    tok_dir = str(load_tokenizer(args.model).name_or_path)
    model_dir = str(Path(tok_dir).parent / "model")
    folder = Path(args.dir) / str(args.n)
    paths = [folder / f"{k}.{args.format}" for k in "abc"]
    only = set(args.only.split(","))
    if args.format != "jsonl" and only & {"edit", "encode", "floor", "trl"}:
        raise SystemExit("--format json/parquet: only the check, warm and tokenize stages (the others read JSON Lines)")
    if args.reuse and all(p.exists() for p in paths):  # the same rows (the generator is seeded); caches cleared
        for name in ("cache", "run", "hf", "trl-out") if "check" in only else ("run",):
            shutil.rmtree(folder / name, ignore_errors=True)
        print(f"reusing the {args.n} conversations in {folder}", flush=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
        paths = generate(args.n, folder, fmt=args.format)
    cfg = write_config(folder, paths, args.model, args.num_proc)
    sft = [sys.executable, "-m", "sft"]
    me = [sys.executable, __file__]
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[tuple[str, dict[str, Any]]] = []

    def run(name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> dict[str, Any]:
        r = measure(cmd, {**env, **(extra_env or {})})
        rows.append((name, r))
        print(f"{name}: {r['seconds']:.1f} s, peak PSS {r['peak_pss_mb']:.0f} MB", flush=True)
        return r

    check = [*sft, "data", "check", str(cfg), "--json"]
    if "check" in only:
        report = json.loads(run("sft data check, cold cache", check)["stdout"])
    else:  # (with --reuse: the cache of an earlier run, warm) the counts only, not measured
        report = json.loads(measure(check, env)["stdout"])
    if "edit" in only:
        with paths[1].open("a") as f:  # edit one file of three
            f.write(json.dumps(conversation(random.Random(1), args.n)) + "\n")
        run("sft data check, one of 3 files edited", check)
    if "warm" in only:
        run("sft data check, warm cache", check)
    if "tokenize" in only:
        shutil.rmtree(folder / "cache")
        run("sft data tokenize, cold cache", [*sft, "data", "tokenize", str(cfg), "--out", str(folder / "tok.jsonl")])
        (folder / "tok.jsonl").unlink()
    if "encode" in only:
        run("sft tokenize+mask only (encode_source)", [*me, "--stage", "encode", str(cfg)])
    if "floor" in only:
        run("floor: render + batch encode", [*me, "--stage", "floor", tok_dir, *map(str, paths)])
    trl = None
    if "trl" in only and args.trl_python and Path(args.trl_python).exists():
        trl = run(f"TRL SFTTrainer preparation (dataset_num_proc={usable_cores()})",
                  [args.trl_python, __file__, "--stage", "trl", "--num-proc", str(usable_cores()), model_dir, tok_dir,
                   *map(str, paths)])

    trained: list[tuple[int, dict[str, Any]]] = []
    if args.train_vs:
        small = Path(args.dir) / str(args.train_vs)
        shutil.rmtree(small, ignore_errors=True)
        small_cfg = write_config(small, generate(args.train_vs, small), args.model, args.num_proc)
        measure([*sft, "data", "check", str(small_cfg), "--json"], env)  # warms its cache
        for size, c in ((args.train_vs, small_cfg), (args.n, cfg)):
            r = train_rss(c, c.parent / "run")
            trained.append((size, r))
            print(f"train over {size}: first step {r['first_step_s']:.1f} s, PSS at step 10 {r['pss_at_step_mb']:.0f} MB, "
                  f"peak {r['peak_pss_mb']:.0f} MB", flush=True)

    n, tokens = report["conversations"], report["total_tokens"]
    table = [f"{args.n} generated conversations ({args.format}; {n} after edit-free check, {tokens} tokens), model {args.model}, "
             f"data.num_proc {args.num_proc}", ""]
    if rows:
        table += ["| stage | seconds | conv/s | peak memory (MB, PSS of the process tree) |", "|---|---|---|---|"]
    for name, r in rows:
        secs = r["seconds"]
        inner = json.loads(r["stdout"]) if name.startswith(("sft tokenize+mask", "floor", "TRL")) else None
        if inner:  # the stage's own timer (excludes interpreter start, model and data loading)
            secs = inner["seconds"]
            name += " (own timer)"
        table.append(f"| {name} | {secs:.1f} | {n / secs:.0f} | {r['peak_pss_mb']:.0f} |")
    if trained:
        table += ["", f"`sft train` {args.model}, 10 steps of one 2048-token row (batch 1, no accumulation, eager), warm data cache:", "",
                  "| conversations | seconds to the first step | PSS at step 10 (MB) | peak PSS (MB) |", "|---|---|---|---|"]
        table += [f"| {size} | {r['first_step_s']:.1f} | {r['pss_at_step_mb']:.0f} | {r['peak_pss_mb']:.0f} |" for size, r in trained]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## data_scale {args.n} ({stamp})\n\nMachine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs "
            f"({usable_cores()} usable), SHARED with other sessions; `uptime` before writing: {load}.\n"
            f"Command: `.venv/bin/python bench/data_scale.py --n {args.n} --only {args.only}"
            f"{' --trl-python ' + args.trl_python if trl else ''}{f' --train-vs {args.train_vs}' if trained else ''}"
            f"{' --reuse' if args.reuse else ''}{' --format ' + args.format if args.format != 'jsonl' else ''}`\n\n"
            + "\n".join(table) + "\n")
    print(text)
    with RESULTS.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
