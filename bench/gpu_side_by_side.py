"""TRL 1.16 at its fastest vs `sft bench`, side by side on one GPU, for SmolLM2-135M and a 1B-class
model (Llama-3.2-1B's configuration, random weights), at max_length 2048.

On the GPU machine (PyTorch with CUDA; TRL in the same Python if it can be installed there):

    python bench/gpu_side_by_side.py --prepare runs/gpu-assets            # here, on the CPU: tokenizer + data
    PYTHONPATH=src python bench/gpu_side_by_side.py --assets runs/gpu-assets --append

Each (model, tool) pair runs in its own process, so its peak memory is its own. Figures:
tokens/s (non-padding tokens of the timed optimizer steps; 1 warm-up step not timed), MFU =
tokens/s x 6 x parameters / the GPU's dense bf16 datasheet peak (the same definition for both
tools; attention's T^2 term not counted), peak VRAM (torch.cuda.max_memory_allocated). TRL runs
in its fastest configuration there: bf16, packing (best-fit, position_ids: padding-free), no
gradient checkpointing, Liger kernels if `liger_kernel` imports, FlashAttention-2 if `flash_attn`
imports (else sdpa). sft runs `train.precision: bf16` (pure bf16 + fp32 master weights), packing,
`train.attention: auto` (padding-free varlen on CUDA). With --append the table goes to
bench/RESULTS.md with the device, date and versions.

`--tiny` checks the script on a CPU in a minute: 2-layer models, max_length 128, 2 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/alpaca_en_demo.json")

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), and SmolLM2-135M's, for random-weight models.
LLAMA_32_1B = {
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
SMOLLM2_135M = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0, "tie_word_embeddings": True, "hidden_act": "silu",
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


def prepare(assets: Path, rows: int) -> None:
    """Tokenizer of SmolLM2 and the alpaca rows as one JSON file: all the GPU machine needs."""
    sys.path.insert(0, str(ROOT / "src"))
    from sft.models.load import load_tokenizer

    assets.mkdir(parents=True, exist_ok=True)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(str(assets / "tokenizer"))
    (assets / "alpaca.json").write_text(json.dumps(json.loads(DATA.read_text())[:rows]))
    print(f"wrote {assets}")


def make_model(kind: str, assets: Path, out: Path, tiny: bool) -> dict[str, Any]:
    """A model dir for ``kind``: SmolLM2-135M from sft's packaged weights when they are there
    (else its config with random weights), or Llama-3.2-1B's config with random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(assets / "tokenizer"))
    source = "random weights"
    if kind == "smollm2-135m" and not tiny:
        try:
            sys.path.insert(0, str(ROOT / "src"))
            from sft.models.load import model_dir, resolve

            src = model_dir(resolve("smollm2-135m-instruct"))
            shutil.copytree(src, out, dirs_exist_ok=True)
            return {"model": kind, "source": f"packaged weights ({src})", "dir": str(out)}
        except Exception as e:  # the packaged weights are optional on a GPU machine
            source = f"random weights (packaged weights unavailable: {type(e).__name__})"
    shape = dict(SMOLLM2_135M if kind == "smollm2-135m" else LLAMA_32_1B)
    if tiny:
        shape.update(TINY, vocab_size=len(tok))
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {"model": kind, "source": source, "dir": str(out)}


def count_params(model: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def child_sft(a: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "src"))
    from sft.config import load_config
    from sft.training.throughput import bench

    cfg = load_config(None, [
        f"--model={a.model_dir}", f"--data.train={a.assets / 'alpaca.json'}", f"--output_dir={a.work / 'sft-out'}",
        f"--data.max_length={a.max_length}", "--data.packing=true", f"--train.batch_size={a.batch}",
        "--train.precision=bf16", "--train.lr=2e-5", f"--data.cache_dir={a.work / 'cache'}",
        f"--train.compile={a.compile}", *a.sft_override,
    ])
    r = bench(cfg, a.steps)
    return {"tool": "sft", "tokens_per_s": r["tokens_per_s"], "peak_vram_gb": r.get("peak_vram_gb"),
            "peak_rss_gb": r["peak_rss_gb"], "params": r["params"], "losses": r["losses"],
            "step_seconds": r["step_seconds"], "attention": r.get("attention"), "compile": r.get("compile"),
            "compile_s": r.get("compile_s")}


def child_trl(a: argparse.Namespace) -> dict[str, Any]:
    import importlib.util
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    liger = importlib.util.find_spec("liger_kernel") is not None and cuda
    flash = importlib.util.find_spec("flash_attn") is not None and cuda
    attn = "flash_attention_2" if flash else "sdpa"
    tok = AutoTokenizer.from_pretrained(str(a.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(a.model_dir), dtype=torch.float32, attn_implementation=attn)
    rows = []
    for r in json.loads((a.assets / "alpaca.json").read_text()):
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "completion": [{"role": "assistant", "content": r["output"]}]})
    counts: list[int] = []
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    bf16 = cuda or a.tiny
    args = SFTConfig(
        output_dir=str(a.work / "trl-out"), max_steps=a.steps + 1, per_device_train_batch_size=a.batch,
        learning_rate=2e-5, max_length=a.max_length, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not cuda, dataloader_num_workers=0, seed=42, packing=True, bf16=bf16,
        gradient_checkpointing=False, use_liger_kernel=liger,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        b = collate(features)
        mask = b.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int(b["input_ids"].numel()))
        return b

    trainer.data_collator = counting
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = times[1 : a.steps + 1]
    import trl

    return {
        "tool": "trl", "tokens_per_s": round(sum(counts[1 : a.steps + 1]) / sum(timed), 2),
        "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if cuda else None,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "params": count_params(model), "step_seconds": [round(t, 3) for t in timed],
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h][1:],
        "config": {"bf16": bf16, "packing": True, "gradient_checkpointing": False, "liger": liger,
                   "attn_implementation": attn}, "trl": trl.__version__,
    }


def varlen_check() -> list[dict[str, Any]]:
    """sft's padding-free attention on this device (on CUDA: torch's varlen_attn kernel, never run in
    the CPU test suite): packed logits vs each document alone, in bf16, Llama and Gemma 3 (sliding
    window), with the leaking control (the packed tokens as one document)."""
    import copy

    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
    from sft.lm import attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
        "gemma3": Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    }
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 1000, (n,), generator=g).to(dev) for n in (37, 5, 64, 20)]
    pos = torch.cat([torch.arange(len(d), device=dev) for d in docs])[None]
    batch = {"input_ids": torch.cat(docs)[None], "position_ids": pos}
    out = []
    for name, m in models.items():
        m = m.to(dev, torch.bfloat16).eval()
        v = attention.use_varlen(copy.deepcopy(m))
        with torch.no_grad():
            flat = attention.flatten_packed(batch)
            packed = v(**flat, use_cache=False).logits[0].float()
            alone = torch.cat([m(input_ids=d[None], use_cache=False).logits[0].float() for d in docs])
            one = torch.tensor([0, pos.shape[1]], dtype=torch.int32, device=dev)
            leaky = v(**dict(flat, cu_seq_lens_q=one, cu_seq_lens_k=one, max_length_q=pos.shape[1],
                             max_length_k=pos.shape[1]), use_cache=False).logits[0].float()
        out.append({"model": name, "device": dev, "max_abs_diff_packed_vs_alone": float((packed - alone).abs().max()),
                    "control_one_document_diff": float((leaky - alone).abs().max())})
    return out


def device_info() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M"), "load_1m": round(os.getloadavg()[0], 2)}


def run_child(python: str, tool: str, model_dir: str, a: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    cmd = [python, __file__, "--child", tool.split("_")[0], "--model-dir", model_dir, "--assets", str(a.assets),
           "--work", str(a.work), "--steps", str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length)]
    cmd += ["--tiny"] if a.tiny else []
    cmd += ["--compile", a.compile]
    cmd += [f"--sft-override={o}" for o in (*a.sft_override, *extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.child_timeout)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"tool": tool, "error": last[:300], "seconds": round(time.perf_counter() - t, 1)}
    res = json.loads(p.stdout.strip().splitlines()[-1]) | {"tool": tool}
    res["seconds"] = round(time.perf_counter() - t, 1)
    return res


def mfu(r: dict[str, Any], peak: float | None) -> str:
    if "error" in r or not peak:
        return "-"
    return f"{r['tokens_per_s'] * 6 * r['params'] / peak * 100:.1f}%"


def table(rows: list[dict[str, Any]], peak: float | None) -> str:
    out = ["| model | tool | tokens/s | MFU (6N, datasheet bf16 peak) | peak VRAM GB | peak RSS GB | sft / TRL | notes |",
           "|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        pair = {r["tool"]: r for r in rows if r["model"] == model}
        ratio = "-"
        if all("tokens_per_s" in pair.get(t, {}) for t in ("sft", "trl")):
            ratio = f"{pair['sft']['tokens_per_s'] / pair['trl']['tokens_per_s']:.2f}x"
        for tool, r in pair.items():
            if "error" in r:
                out.append(f"| {model} | {tool} | not run | | | | | {r['error']} |")
                continue
            vram = f"{r['peak_vram_gb']:.2f}" if r.get("peak_vram_gb") is not None else "-"
            note = json.dumps(r.get("config")) if tool == "trl" else f"attention {r.get('attention')}, compile {r.get('compile')} ({r.get('compile_s')} s)"
            if tool == "sft_fp32" and "tokens_per_s" in pair.get("sft", {}):
                note += f"; sft bf16 / fp32 {pair['sft']['tokens_per_s'] / r['tokens_per_s']:.2f}x"
            out.append(f"| {model} ({r.get('source', '')}) | {tool} | {r['tokens_per_s']:.0f} | {mfu(r, peak)} | {vram} | "
                       f"{r['peak_rss_gb']:.2f} | {ratio if tool == 'sft' else ''} | {note} |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", type=Path, help="write the tokenizer and data to this folder, then stop")
    p.add_argument("--assets", type=Path, default=ROOT / "runs" / "gpu-assets")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-side-by-side"))
    p.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="sft's train.compile (auto: compiled on CUDA; bench decides as for a long run)")
    p.add_argument("--sft-override", action="append", default=[])
    p.add_argument("--trl-python", default=sys.executable, help="a Python with TRL (default: this one)")
    p.add_argument("--sft-python", default=sys.executable)
    p.add_argument("--child-timeout", type=int, default=300)
    p.add_argument("--tiny", action="store_true", help="2-layer models, max_length 128, 2 steps: a CPU check")
    p.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--fp32", action="store_true", help="also run sft in fp32 (row sft_fp32: is bf16 faster?)")
    p.add_argument("--child", choices=["sft", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.prepare:
        prepare(a.prepare, rows=1000)
        return 0
    if a.child:
        print(json.dumps(child_sft(a) if a.child == "sft" else child_trl(a)), flush=True)
        return 0
    if a.tiny:
        a.steps, a.batch, a.max_length = 2, 2, 128
    if not (a.assets / "tokenizer").exists():
        prepare(a.assets, rows=1000)
    a.work.mkdir(parents=True, exist_ok=True)
    info = device_info()
    print(json.dumps(info), flush=True)
    checks = varlen_check()
    print(json.dumps(checks), flush=True)
    rows: list[dict[str, Any]] = []
    for kind in a.models.split(","):
        made = make_model(kind, a.assets, a.work / kind, a.tiny)
        runs: list[tuple[str, str, tuple[str, ...]]] = [("trl", a.trl_python, ()), ("sft", a.sft_python, ())]
        if a.fp32:
            runs.append(("sft_fp32", a.sft_python, ("--train.precision=fp32",)))
        for tool, python, extra in runs:
            r = run_child(python, tool, made["dir"], a, extra) | {"model": kind, "source": made["source"]}
            print(json.dumps(r), flush=True)
            rows.append(r)
    sys.path.insert(0, str(ROOT / "src"))
    from sft.training.throughput import gpu_spec_peak

    peak = gpu_spec_peak(info["device"])
    text = table(rows, peak)
    print(text)
    if a.append:
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n## GPU side by side (issue 11) {info['date']}, {info['device']}\n\n"
                    f"`PYTHONPATH=src python bench/gpu_side_by_side.py --assets runs/gpu-assets --append`"
                    f"{' --tiny' if a.tiny else ''}: max_length {a.max_length}, batch {a.batch}, {a.steps} timed steps; "
                    f"torch {info['torch']}, transformers {info['transformers']}, CUDA {info['cuda']}; "
                    f"datasheet bf16 peak {peak or 'unknown'} FLOP/s.\n\n{text}\n\n"
                    f"Padding-free attention check (bf16 logits, packed vs alone; control = one document): "
                    f"{json.dumps(checks)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
