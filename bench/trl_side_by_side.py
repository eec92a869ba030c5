"""TRL's SFTTrainer vs `sft bench` on the same model, data and hyperparameters; prints the ratio.

Run it with a Python that has TRL (never install TRL into the project venv):

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl 'trl==1.16.*'
    HF_HUB_OFFLINE=1 /tmp/trl-venv/bin/python bench/trl_side_by_side.py --trl packing_bf16_nogc --steps 8 --rounds 2

Each round runs `sft bench` (the project venv) and then TRL (this Python), each in its own process
(so each peak RSS is its own), and records the 1-minute load average before and after each: on a
shared machine, compare only figures of the same round.

Gemma 3 270M at 2048 tokens (batch 1, as bench/bench_configs/gemma_2048.yaml; the base model has no
chat template, so TRL gets sft's templates/gemma.jinja):

    HF_HUB_OFFLINE=1 /work/trl-venv/bin/python bench/trl_side_by_side.py --model gemma-3-270m \
        --max-length 2048 --batch 1 --sft-config bench/bench_configs/gemma_2048.yaml --steps 4

Default, same as bench/bench_configs/smollm2_full.yaml: SmolLM2-135M-Instruct from sft's cache, the first
400 rows of alpaca_en_demo.json as conversational prompt/completion (chat template applied,
loss on the completion), max_length 512, batch 4, lr 2e-5, AdamW. Tokens/s counts non-padding
tokens of the timed optimizer steps (step 1 is a warm-up and is not timed), like `sft bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/alpaca_en_demo.json")

# TRL's own defaults are bf16=True and gradient_checkpointing=True (SFTConfig docstring).
TRL_CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "defaults_fp32": {"bf16": False},
    "packing": {"packing": True},
    "packing_fp32_nogc": {"packing": True, "bf16": False, "gradient_checkpointing": False},
    "packing_bf16_nogc": {"packing": True, "bf16": True, "gradient_checkpointing": False},
    # the model loaded in bf16 too (no fp32 master weights: fast, but small updates round away)
    "packing_bf16w_nogc": {"packing": True, "bf16": True, "gradient_checkpointing": False,
                           "model_init_kwargs": {"dtype": "bfloat16"}},
}


def rows(limit: int) -> list[dict[str, Any]]:
    out = []
    for r in json.loads(DATA.read_text())[:limit]:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": r["output"]}]})
    return out


def sft_model_dir(alias: str = "smollm2-135m-instruct") -> str:
    """The project venv's cached HF dir of the model (the package path, hence the cache key, differs
    between venvs, so ask the project's Python, else fall back to this one)."""
    code = f"from sft.models.load import model_dir, resolve; print(model_dir(resolve({alias!r})))"
    py = ROOT / ".venv" / "bin" / "python"
    if py.exists():
        return subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    from sft.models.load import model_dir, resolve

    return str(model_dir(resolve(alias)))


def run_trl(name: str, steps: int, limit: int, max_length: int, batch: int, lr: float,
            alias: str = "smollm2-135m-instruct") -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = sft_model_dir(alias)
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:  # a base model (Gemma 3 270M): sft's own Gemma template
        tok.chat_template = (ROOT / "src" / "sft" / "templates" / "gemma.jinja").read_text()
    overrides = dict(TRL_CONFIGS[name])
    dtype = overrides.pop("model_init_kwargs", {}).get("dtype", "float32")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    counts: list[int] = []
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.t)

    args = SFTConfig(
        output_dir="/tmp/trl-bench-out", max_steps=steps + 1, per_device_train_batch_size=batch,
        learning_rate=lr, max_length=max_length, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, seed=42, **overrides,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows(limit)),
                         processing_class=tok, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        b = collate(features)
        mask = b.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(b["input_ids"].numel()))
        return b

    trainer.data_collator = counting
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = times[1 : steps + 1]
    return {
        "tool": "trl", "config": name, "overrides": TRL_CONFIGS[name], "steps": steps,
        "tokens_per_s": round(sum(counts[1 : steps + 1]) / sum(timed), 2),
        "step_seconds": [round(t, 3) for t in timed], "losses": losses[1:],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "train_seconds": round(total, 1), "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
        "torch": torch.__version__, "model_dtype": dtype, "model": alias, "max_length": max_length, "batch": batch,
    }


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def run_json(cmd: list[str]) -> dict[str, Any]:
    """Run one measurement in its own process; its last stdout line is a JSON object."""
    load_before = load_1m()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["load_1m_before"], res["load_1m_after"] = load_before, load_1m()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl", default="packing_bf16_nogc", choices=sorted(TRL_CONFIGS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="sft then TRL, this many times (interleaved)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="TRL's model: an sft alias (its cached HF dir)")
    p.add_argument("--max-length", type=int, default=512, help="TRL's max_length (match the sft config's)")
    p.add_argument("--batch", type=int, default=4, help="TRL's per-device batch (match the sft config's)")
    p.add_argument("--sft-config", default=str(ROOT / "bench" / "bench_configs" / "smollm2_full.yaml"))
    p.add_argument("--sft-override", action="append", default=[], help="e.g. --sft-override=--train.compile=true")
    p.add_argument("--sft-cmd", default=str(ROOT / ".venv" / "bin" / "sft"))
    p.add_argument("--only-trl", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not importable here; run with a venv that has trl (see this file's docstring)")
        return 1
    if a.only_trl:
        print(json.dumps(run_trl(a.trl, a.steps, limit=400, max_length=a.max_length, batch=a.batch, lr=2e-5,
                                 alias=a.model)), flush=True)
        return 0
    results = []
    for r in range(a.rounds):
        sft = run_json([a.sft_cmd, "bench", a.sft_config, "--steps", str(a.steps), "--json", *a.sft_override])
        sft["round"] = r + 1
        print(json.dumps(sft), flush=True)
        res = run_json([sys.executable, __file__, "--only-trl", "--trl", a.trl, "--steps", str(a.steps),
                        "--model", a.model, "--max-length", str(a.max_length), "--batch", str(a.batch)])
        res["round"] = r + 1
        print(json.dumps(res), flush=True)
        print(f"round {r + 1}: sft {sft['tokens_per_s']:.1f} tok/s, {sft['peak_rss_gb']:.2f} GB, MFU "
              f"{sft['mfu'] * 100:.1f}% of {sft['peak_flops'] / 1e9:.0f} GFLOP/s {sft['precision']} (load "
              f"{sft['load_1m_before']}->{sft['load_1m_after']}) vs TRL[{a.trl}] {res['tokens_per_s']:.1f} tok/s, "
              f"{res['peak_rss_gb']:.2f} GB (load {res['load_1m_before']}->{res['load_1m_after']}): "
              f"{sft['tokens_per_s'] / res['tokens_per_s']:.2f}x", flush=True)
        results += [sft, res]
    return 0


if __name__ == "__main__":
    sys.exit(main())
