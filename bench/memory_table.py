"""The "largest model that trains here" table: real architectures (bench/archs.py, initialised at
random from their configs, no download) at 1 x 2048 tokens, full / LoRA / QLoRA, with and without
gradient checkpointing: `sft plan`'s estimate, and for the rows that fit, the measured peak RSS and
tokens/s of one optimizer step through sft's own step (sft.training.step.train_step: chunked loss,
AdamW with the bf16 master copy, clipping).

    python bench/memory_table.py plan                       # every row's estimate (no model built)
    python bench/memory_table.py row ARCH METHOD CKPT       # one row, in this process (CKPT: 0 or 1)
    python bench/memory_table.py run OUT.jsonl [--cap S] [--max-gb G] [--only ARCH,...]   # each row in a child
    python bench/memory_table.py markdown OUT.jsonl         # the table for bench/RESULTS.md
    python bench/memory_table.py trace ARCH METHOD CKPT     # one row with RSS and glibc's heap sampled

``run`` starts one child per row (so each row's peak RSS is its own process's, from getrusage) and
skips rows whose estimate is above ``--max-gb`` (default 20: this 24 GB machine is shared) as
"does not fit (plan)", and rows still running after ``--cap`` seconds as "skipped: time cap".
Run it under /work/wt/bin/measure.

The model is built on the meta device and materialised one decoder layer at a time (normal(0, 0.02)
weights, unit norms), and for QLoRA each layer's linear weights are quantized to NF4 by bitsandbytes
(``Params4bit``) as soon as they exist, so no whole bf16 copy is ever held; `sft train` reaches the
same state through transformers' ``BitsAndBytesConfig`` loader, which quantizes tensor by tensor.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENS = int(os.environ.get("MEMTABLE_TOKENS", "2048"))  # smaller only to try the script out
METHODS = ("full", "lora", "qlora")


def _archs() -> dict[str, dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("archs", ROOT / "bench" / "archs.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ARCHS  # type: ignore[no-any-return]


def config_for(method: str, ckpt: bool) -> Any:
    from sft.config import load_config

    return load_config(None, [f"--train.method={method}", f"--train.gradient_checkpointing={str(ckpt).lower()}",
                              "--train.batch_size=1", f"--data.max_length={TOKENS}", "--train.precision=bf16",
                              "--data.packing=false"])


def estimate_gb(arch: str, method: str, ckpt: bool) -> float:
    from sft.training import plan

    cfg = config_for(method, ckpt)
    budget, device = plan.device_memory()
    e = plan.estimate(plan.shape_of(_archs()[arch]), plan.settings_of(cfg, "bf16"), budget, device)
    return e.peak / plan.GB


def build(arch: str, method: str) -> Any:
    """The model at random, materialised layer by layer (QLoRA: each layer's linears NF4 at once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(_archs()[arch])
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(0)

    def fill(module: torch.nn.Module) -> None:
        module.to_empty(device="cpu", recurse=False)
        for p in module.parameters(recurse=False):
            with torch.no_grad():
                if p.ndim == 1 and "norm" in type(module).__name__.lower():
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)

    def quantize_linears(layer: torch.nn.Module) -> None:
        import bitsandbytes as bnb

        from sft.models.quantize import bnb_config

        nf4 = bnb_config(config_for(method, False), torch.bfloat16)  # lora.quant_blocksize, lora.double_quant

        for name, child in list(layer.named_modules()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             blocksize=nf4.blocksize, compress_statistics=nf4.double_quant)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                q = q.to("cpu")  # quantizes
                q.support_avx512bf16_for_cpu = False  # sft.models.quantize.keep_training_layout
                owner, _, attr = name.rpartition(".")
                setattr(layer.get_submodule(owner) if owner else layer, attr, q)

    def fill_tree(root: torch.nn.Module) -> None:
        for m in root.modules():
            if "Rotary" not in type(m).__name__ and (list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))):
                fill(m)

    for layer in model.model.layers:  # one layer at a time: at most one layer's bf16 linears beside the rest
        fill_tree(layer)
        if method == "qlora":
            quantize_linears(layer)
    fill(model.model.embed_tokens)
    fill(model.model.norm)
    if not config.tie_word_embeddings:
        fill(model.lm_head)
    rot = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rot)(config=config)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def row(arch: str, method: str, ckpt: bool, on_phase: Callable[[str], None] = lambda what: None) -> dict[str, Any]:
    """One optimizer step (after one warm-up step for tokens/s when time allows) through sft's step;
    ``on_phase(name)`` after the build, the preparation and each step (``trace``)."""
    import torch

    from sft.data.types import Example
    from sft.runtime import local
    from sft.training.optim import make_optimizer
    from sft.training.prepare import prepare_model
    from sft.training.step import train_step

    t0 = time.perf_counter()
    cfg = config_for(method, ckpt)
    rt = local(cfg)
    model = build(arch, method)
    on_phase("built")
    model = prepare_model(cfg, model)
    model.train()
    optimizer = make_optimizer(model, cfg.train)
    on_phase("prepared")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (TOKENS,), generator=gen).tolist()
    examples = [Example(ids, ids)]
    built = time.perf_counter() - t0
    steps = int(os.environ.get("MEMTABLE_STEPS", "1"))
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        r = train_step(model, optimizer, [[[0]]], examples, cfg, 0, rt, 1e-5)
        times.append(time.perf_counter() - t)
        losses.append(r.loss)
        on_phase(f"step {len(times)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"arch": arch, "method": method, "checkpointing": ckpt, "peak_rss_gb": round(peak, 2),
            "step_s": [round(x, 1) for x in times], "tokens_per_s": round(TOKENS / times[-1], 1),
            "build_s": round(built, 1), "loss": round(losses[-1], 4)}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def trace(arch: str, method: str, ckpt: bool) -> None:
    """``row`` with RSS and glibc malloc's books (mallinfo2: heap bytes in use, heap bytes free but
    kept, mmapped bytes) sampled every 50 ms, printed after each phase and at the peak RSS: where
    the peak is live tensors and where it is memory the allocator keeps (glibc only)."""
    import threading

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    page = os.sysconf("SC_PAGE_SIZE")

    def sample() -> tuple[float, float, float, float]:
        m = libc.mallinfo2()
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        return rss / 1e9, m.uordblks / 1e9, m.fordblks / 1e9, m.hblkhd / 1e9

    samples: list[tuple[float, float, float, float]] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(0.05):
            samples.append(sample())

    def show(what: str, x: tuple[float, float, float, float]) -> None:
        print(f"{what:14s} RSS {x[0]:6.2f} GB | heap in use {x[1]:5.2f} | heap free, kept {x[2]:5.2f} | "
              f"mmapped {x[3]:5.2f}", flush=True)

    threading.Thread(target=sampler, daemon=True).start()
    show("start", sample())
    r = row(arch, method, ckpt, on_phase=lambda what: show(what, sample()))
    done.set()
    show("peak RSS", max(samples))
    print(json.dumps(r), flush=True)


def all_rows() -> list[tuple[str, str, bool]]:
    return [(a, m, c) for a in _archs() for m in METHODS for c in (False, True)]


def run(out: Path, cap: float, max_gb: float, only: list[str]) -> None:
    done = {(r["arch"], r["method"], r["checkpointing"]) for r in map(json.loads, out.read_text().splitlines())} \
        if out.exists() else set()
    for arch, method, ckpt in all_rows():
        if (arch, method, ckpt) in done or (only and arch not in only):
            continue
        est = estimate_gb(arch, method, ckpt)
        rec: dict[str, Any] = {"arch": arch, "method": method, "checkpointing": ckpt, "plan_gb": round(est, 2),
                               "load_before": os.getloadavg()[0]}
        if est > max_gb:
            rec["status"] = (f"not run: plan {est:.1f} GB, above the {max_gb:g} GB cap for this shared machine"
                             if est <= 0.9 * 24 * 2**30 / 1e9 else "does not fit (plan)")
        else:
            t = time.perf_counter()
            try:
                p = subprocess.run([sys.executable, __file__, "row", arch, method, str(int(ckpt))], capture_output=True,
                                   text=True, timeout=cap, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if p.returncode == 0:
                    rec.update(json.loads(p.stdout.strip().splitlines()[-1]))
                    rec["status"] = "measured"
                    rec["error_pct"] = round(100 * (est - rec["peak_rss_gb"]) / rec["peak_rss_gb"], 1)
                else:
                    rec["status"] = f"failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else ''}"
            except subprocess.TimeoutExpired:
                rec["status"] = f"skipped: time cap ({cap:g} s)"
            rec["wall_s"] = round(time.perf_counter() - t, 1)
        rec["load_after"] = os.getloadavg()[0]
        print(json.dumps(rec), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def markdown(rows_file: Path) -> str:
    """The table for bench/RESULTS.md and the README, from ``run``'s JSON lines (every row of
    ``all_rows``; a row never run shows its estimate only)."""
    got = {(r["arch"], r["method"], r["checkpointing"]): r for r in map(json.loads, rows_file.read_text().splitlines())}
    lines = ["| model | params | method | checkpointing | plan (GB) | fits 24 GB (plan) | peak RSS (GB) | plan error | "
             "tokens/s (1 step) | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    from sft.training import plan

    for arch, method, ckpt in all_rows():
        est = estimate_gb(arch, method, ckpt)
        r = got.get((arch, method, ckpt), {})
        fits = est <= plan.FIT_FRACTION * 24 * 2**30 / plan.GB
        measured = r.get("status") == "measured"
        lines.append(" | ".join([
            f"| {arch}", f"{plan.shape_of(_archs()[arch]).params() / 1e9:.2f}B", method, "on" if ckpt else "off",
            f"{est:.1f}", "yes" if fits else "no",
            f"{r['peak_rss_gb']:.1f}" if measured else "-",
            f"{100 * (est - r['peak_rss_gb']) / r['peak_rss_gb']:+.0f}%" if measured else "-",  # today's plan
            f"{r['tokens_per_s']:.0f}" if measured else "-",
            (f"measured (load {r['load_before']:.1f})" if measured else r.get("status", "not run (time)")) + " |"]))
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    cmd = sys.argv[1]
    if cmd == "plan":
        for arch, method, ckpt in all_rows():
            print(f"{arch:14s} {method:6s} ckpt={int(ckpt)} plan {estimate_gb(arch, method, ckpt):6.2f} GB")
    elif cmd == "markdown":
        print(markdown(Path(sys.argv[2])))
    elif cmd == "trace":
        trace(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
    elif cmd == "row":
        print(json.dumps(row(sys.argv[2], sys.argv[3], sys.argv[4] == "1")))
    elif cmd == "run":
        args = sys.argv[3:]
        cap = float(args[args.index("--cap") + 1]) if "--cap" in args else 900.0
        max_gb = float(args[args.index("--max-gb") + 1]) if "--max-gb" in args else 20.0
        only = args[args.index("--only") + 1].split(",") if "--only" in args else []
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}",
              file=sys.stderr)
        run(Path(sys.argv[2]), cap, max_gb, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
