"""GPU checks of the training path (run on a CUDA machine; not part of the test suite).

    PYTHONPATH=src python bench/gpu_check.py --tokenizer DIR --data FILE [--out DIR]

1. packed-vs-separate logits on CUDA (sdpa; fp32 and bf16) for a tiny Llama and a tiny Gemma 3,
   with the leaking control (positions that do not restart);
2. batch 4 x accumulation 1 == batch 1 x accumulation 4 through `sft.training.loop.train` on CUDA (fp32);
3. throughput of `sft train` for a SmolLM2-135M-shaped model (random init) on real data, fp32 and bf16;
4. device placement (issue 10): `sft train` (with the before/after evaluation, held-out loss and
   the KL base model), `sft eval`, `sft generate` and `sft chat` run every matmul, embedding and
   attention op on CUDA; an op with a CPU tensor is listed and fails the check.

    PYTHONPATH=src python bench/gpu_check.py --tokenizer DIR --data FILE --only devices [--expect cpu]

``--expect cpu`` runs check 4 on a machine without a GPU (it must then find every op on the CPU);
``--expect cuda`` on a CPU machine is the control: it fails, listing the CPU ops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def tiny_models(vocab: int) -> dict[str, torch.nn.Module]:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096))
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=4096, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"]))
    return {"llama": llama, "gemma3": gemma}


def packed_logits_check(vocab: int) -> list[dict[str, object]]:
    rows = []
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, vocab, (n,), generator=g) for n in (37, 5, 64, 20)]
    ids = torch.cat(docs)[None].cuda()
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None].cuda()
    for name, model in tiny_models(vocab).items():
        for dtype in (torch.float32, torch.bfloat16):
            m = model.to("cuda", dtype).eval()
            with torch.no_grad():
                packed = m(input_ids=ids, position_ids=pos, use_cache=False).logits[0].float()
                leaky = m(input_ids=ids, position_ids=torch.arange(ids.shape[1], device="cuda")[None],
                          use_cache=False).logits[0].float()
                alone, start = [], 0
                for d in docs:
                    alone.append(m(input_ids=d[None].cuda(), use_cache=False).logits[0].float())
                    start += len(d)
                sep = torch.cat(alone)
            rows.append({"model": name, "dtype": str(dtype), "attn": m.config._attn_implementation,
                         "max_abs_diff_packed_vs_alone": float((packed - sep).abs().max()),
                         "control_leaky_diff": float((leaky - sep).abs().max())})
    return rows


def write_data(path: Path, rows: int) -> Path:
    src = json.loads(path.read_text())[:rows]
    out = Path("/tmp/gpu_data.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in src))
    return out


def run_train(model_dir: Path, data: Path, out: Path, *extra: str) -> list[dict[str, object]]:
    from sft.config import load_config
    from sft.training.loop import train

    cfg = load_config(None, [f"--model={model_dir}", f"--data.train={data}", f"--output_dir={out}",
                             f"--data.cache_dir={out.parent / 'cache'}", "--train.warmup=0", *extra])
    train(cfg, overwrite=True, progress=False)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


# aten ops that do the model's compute; collate and the optimizer's bookkeeping are not counted
HEAVY_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "embedding", "embedding_dense_backward",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_efficient_attention_forward", "_flash_attention_forward", "_log_softmax", "logsumexp"}


class OpDevices:
    """Counts, per device type, the HEAVY_OPS run while active (a TorchDispatchMode)."""

    def __init__(self, expect: str) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counts: dict[str, int] = {}
        examples: list[str] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                name = func.overloadpacket.__name__
                if name in HEAVY_OPS:
                    devs = sorted({t.device.type for t in tree_leaves((args, kwargs or {}))
                                   if isinstance(t, torch.Tensor)})
                    key = "+".join(devs)
                    counts[key] = counts.get(key, 0) + 1
                    if key != expect and len(examples) < 5:
                        examples.append(f"{name} on {key}")
                return func(*args, **(kwargs or {}))

        self.mode, self.counts, self.examples = Mode(), counts, examples

    def __enter__(self) -> OpDevices:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def device_check(tok_dir: Path, data: Path, out: Path, expect: str) -> dict[str, object]:
    """Check 4: every heavy op of train / eval / generate / chat runs on ``expect``."""
    import builtins

    from transformers import AutoTokenizer

    from sft.config import load_config
    from sft.evaluation.evaluate import run_eval
    from sft.evaluation.generate import chat, generate_file
    from sft.training.loop import train

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tiny = out / "tiny-devices"
    tiny_models(len(tok))["llama"].save_pretrained(str(tiny))
    tok.save_pretrained(str(tiny))
    run = out / "run-devices"
    common = [f"--model={tiny}", f"--data.train={data}", f"--eval.data={data}", f"--data.cache_dir={out / 'cache'}",
              "--data.max_length=256", "--eval.max_new_tokens=4", "--eval.max_examples=4", "--train.precision=fp32"]
    phases: dict[str, dict[str, object]] = {}

    def phase(name: str, fn: object) -> None:
        with OpDevices(expect) as ops:
            fn()  # type: ignore[operator]
        phases[name] = {"ops_by_device": ops.counts, "not_on_device": ops.examples,
                        "ok": set(ops.counts) == {expect}}
        print(name, json.dumps(phases[name]), flush=True)

    phase("train", lambda: train(load_config(None, [*common, f"--output_dir={run}", "--train.max_steps=4",
                                                    "--train.batch_size=2", "--eval.every=2",
                                                    "--eval.before_after=true"]), overwrite=True, progress=False))
    phase("eval", lambda: run_eval(load_config(None, common), model=str(run / "final"),
                                   out=str(out / "eval-devices.json")))
    prompts = out / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello"}]}) + "\n")
    phase("generate", lambda: generate_file(str(run / "final"), str(prompts), str(out / "gen.jsonl"),
                                            max_new_tokens=4))
    said = iter(["Hello", "/quit"])
    real_input = builtins.input
    builtins.input = lambda prompt="": next(said)
    try:
        phase("chat", lambda: chat(str(run / "final"), max_new_tokens=4))
    finally:
        builtins.input = real_input
    return {"expect": expect, "phases": phases, "ok": all(p["ok"] for p in phases.values())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="/tmp/gpu_out")
    ap.add_argument("--only", choices=["devices"], help="run only check 4")
    ap.add_argument("--expect", default="cuda", choices=["cuda", "cpu"], help="check 4: the device every op must use")
    args = ap.parse_args()
    if args.only == "devices":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = device_check(Path(args.tokenizer), write_data(Path(args.data), 16), out, args.expect)
        result["torch"] = torch.__version__
        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        (out / "device_check.json").write_text(json.dumps(result, indent=1))
        print("device check:", "PASS" if result["ok"] else "FAIL", flush=True)
        return 0 if result["ok"] else 1
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    report["packed_logits"] = packed_logits_check(len(tok))
    print(json.dumps(report, indent=1), flush=True)

    data = write_data(Path(args.data), 400)
    tiny = Path("/tmp/tiny")
    tiny_models(len(tok))["llama"].save_pretrained(str(tiny))
    tok.save_pretrained(str(tiny))
    a = run_train(tiny, data, Path("/tmp/run_a"), "--train.batch_size=4", "--train.grad_accum=1",
                  "--data.packing=false", "--train.max_steps=3", "--train.precision=fp32", "--train.lr=1e-3")
    b = run_train(tiny, data, Path("/tmp/run_b"), "--train.batch_size=1", "--train.grad_accum=4",
                  "--data.packing=false", "--train.max_steps=3", "--train.precision=fp32", "--train.lr=1e-3")
    report["grad_accum_losses"] = {"b4xa1": [r["loss"] for r in a], "b1xa4": [r["loss"] for r in b]}
    print(json.dumps(report["grad_accum_losses"]), flush=True)

    smol = Path("/tmp/smol-random")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0,
    )).save_pretrained(str(smol))
    tok.save_pretrained(str(smol))
    speed = []
    for precision in ("fp32", "bf16"):
        for packing in ("true", "false"):
            t = time.perf_counter()
            rows = run_train(smol, data, Path(f"/tmp/run_{precision}_{packing}"), "--train.batch_size=4",
                             "--data.max_length=512", f"--data.packing={packing}", "--train.max_steps=12",
                             f"--train.precision={precision}", "--train.lr=2e-5")
            timed = rows[2:]  # skip warm-up steps
            secs = timed[-1]["elapsed_s"] - rows[1]["elapsed_s"]  # type: ignore[operator]
            toks = sum(r["tokens"] for r in timed)  # type: ignore[misc]
            speed.append({"precision": precision, "packing": packing, "tokens_per_s": round(toks / secs),
                          "wall_s": round(time.perf_counter() - t, 1),
                          "first_losses": [r["loss"] for r in rows[:3]],
                          "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
            torch.cuda.reset_peak_memory_stats()
            print(json.dumps(speed[-1]), flush=True)
    report["smollm2_shape_train_speed"] = speed
    report["devices"] = device_check(Path(args.tokenizer), write_data(Path(args.data), 16), out, "cuda")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
