"""Issue 22's done-when checks for QLoRA on SmolLM2-135M-Instruct and the demo data (CPU):

    python bench/qlora_check.py OUT_DIR lora|qlora|lora-matched|resume|compare|base [--key=value ...]

- ``lora`` / ``qlora``: 50 steps through the real CLI (same seed, data, lr, batch, max_length),
  peak RSS of the process (getrusage of the child) and, for qlora, the bytes its 4-bit linear weights
  take against the same weights in bf16;
- ``lora-matched``: the control for ``--lora.init=loftq``: a LoRA run (bf16 base) whose adapters start
  exactly as the LoftQ QLoRA run's do (the rank-r SVD of what NF4 loses, same factors), with
  ``scaling * B @ A`` subtracted from its bf16 base so that it starts at the bf16 model: LoftQ's
  adapters (both factors non-zero) train differently from the default ones (B = 0), so this is
  LoRA at the same initialisation, and the two runs differ in the base's NF4 rounding only;
- ``resume``: the qlora run again, SIGKILLed after step 25 (checkpoints every 10), then --resume:
  its 50 losses against the uninterrupted qlora run's;
- ``compare``: the held-out loss after step 50 of lora and qlora (the loop's final ``eval_loss`` on
  examples/demo/eval.jsonl, 172 conversations never trained on, each run's trained model in its
  training precision: the issue's "loss after 50 steps", and not one batch's noise), next to the
  step-50 training loss (one batch of 4) and the mean of steps 41-50; final/ loaded
  in plain transformers against the trained model (the NF4 base with adapter/ applied), greedy,
  on 5 prompts: the first 8 new tokens of each.
- ``base``: the held-out loss of the untrained model in bf16, with its linear layers in NF4 (what
  quantization alone costs before any adapter trains), and NF4 with the qlora run's adapters as
  they start (default init: B = 0, the NF4 model; lora.init: loftq: closer to bf16).

Overrides after the mode go to every qlora run and load (``--lora.init=loftq``: LoftQ-initialised
adapters; ``--lora.init=default``: PEFT's zero-B initialisation); give the same ones to qlora,
resume, compare and base.

Run ``lora`` and ``qlora`` under /work/wt/bin/measure (their memory is reported), the others under busy.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50
SETTINGS = [
    "--model=smollm2-135m-instruct", f"--data.train={ROOT / 'examples/demo/train.jsonl'}", "--data.template=chatml",
    "--data.max_length=256", "--train.batch_size=4", "--train.lr=2e-4", "--train.warmup=5", f"--train.max_steps={STEPS}",
    "--train.seed=42", "--eval.before_after=false",
    # QLoRA runs eager (compile: auto skips bitsandbytes' 4-bit layers); LoRA would compile at 50 steps:
    # both eager, so the runs differ in the base's weights only (same data order, adapter init, dropout)
    "--train.compile=false",
]
QLORA = ["--train.method=qlora", *sys.argv[3:]]  # the overrides after the mode (e.g. --lora.init=loftq)
EVAL_DATA = ROOT / "examples/demo/eval.jsonl"  # held out: scored once, after the last step
PROMPTS = ["What is the opposite of hot?", "Name a colour.", "What is 7 + 5?", "Say hello in French.",
           "My favourite animal is a cat. What is my favourite animal?"]


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def heldout(run: Path) -> float:
    """The run's final held-out loss (``eval_loss`` after its last step, on EVAL_DATA)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return float([r["eval_loss"] for r in rows if "eval_loss" in r][-1])


def cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run `python -m sft ...`; (exit code, the child's peak RSS in GB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rc = subprocess.call([sys.executable, "-m", "sft", *args], env={**os.environ, **(env or {})})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return rc, (peak if peak > before else float("nan")) * 1024 / 1e9


def base_bytes() -> dict[str, float]:
    """Bytes of the decoder's linear weights: NF4 as qlora loads them, and bf16."""
    import torch

    from sft.config import load_config
    from sft.models import quantize
    from sft.models.load import load_model

    cfg = load_config(None, [*SETTINGS, *QLORA])
    model = load_model(cfg.model, torch.bfloat16, quantization=quantize.bnb_config(cfg, torch.bfloat16))
    held, bf16 = quantize.quantized_bytes(model)
    return {"nf4_linear_bytes": held, "bf16_linear_bytes": bf16, "ratio": held / bf16}


def lora_matched(out: Path, config: Path) -> dict[str, object]:
    """The ``lora-matched`` run (in this process: sft's own ``train`` with ``prepare_model`` wrapped)."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft.tuners.lora import LoraLayer

    import sft.training.prepare as prep
    from sft.config import load_config
    from sft.models import quantize
    from sft.training.loop import train

    plain = prep.prepare_model
    nf4 = quantize.bnb_config(load_config(None, [*SETTINGS, *QLORA]), torch.bfloat16)  # the qlora run's NF4

    @torch.no_grad()
    def matched(cfg: object, model: object) -> object:
        model = plain(cfg, model)  # type: ignore[arg-type]
        for module in model.get_base_model().modules():  # type: ignore[attr-defined]
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight  # bf16, as QLoRA quantizes it (lora.quant_blocksize)
                codes, state = bnbf.quantize_4bit(w.data, blocksize=nf4.blocksize, compress_statistics=nf4.double_quant,
                                                  quant_type="nf4", quant_storage=torch.uint8)
                quantize.absorb(module, w.float() - bnbf.dequantize_4bit(codes, state).float())
                w.copy_((w.float() - module.get_delta_weight("default").float()).to(w.dtype))  # starts at bf16
        return model

    prep.prepare_model = matched  # type: ignore[assignment]
    run = out / "lora-matched"
    cfg = load_config(str(config), [*SETTINGS, "--train.method=lora", f"--output_dir={run}"])
    train(cfg, overwrite=True)
    return {"losses": losses(run), "heldout": heldout(run)}


def generate(model: object, tok: object, prompt: str, n: int = 8) -> list[int]:
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,  # type: ignore[attr-defined]
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False)  # type: ignore[attr-defined]
    return [int(t) for t in out[0, ids.shape[1]:]]


def compare(out: Path) -> dict[str, object]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.config import load_config
    from sft.models import quantize
    from sft.models.load import load_model

    lora, qlora = losses(out / "lora"), losses(out / "qlora")
    result: dict[str, object] = {
        "lora_heldout": heldout(out / "lora"), "qlora_heldout": heldout(out / "qlora"),
        "lora_step50": lora[-1], "qlora_step50": qlora[-1],
        "lora_last10": sum(lora[-10:]) / 10, "qlora_last10": sum(qlora[-10:]) / 10,
    }
    result["heldout_rel_diff"] = abs(result["qlora_heldout"] - result["lora_heldout"]) / result["lora_heldout"]  # type: ignore[operator]
    result["step50_rel_diff"] = abs(qlora[-1] - lora[-1]) / lora[-1]
    result["last10_rel_diff"] = abs(result["qlora_last10"] - result["lora_last10"]) / result["lora_last10"]  # type: ignore[operator]
    cfg = load_config(None, [*SETTINGS, *QLORA])
    final_dir = out / "qlora" / "final"
    tok = AutoTokenizer.from_pretrained(str(final_dir))
    final = AutoModelForCausalLM.from_pretrained(str(final_dir), dtype=torch.float32).eval()
    base = load_model(cfg.model, torch.float32, quantization=quantize.bnb_config(cfg, torch.float32))
    trained = PeftModel.from_pretrained(base, str(out / "qlora" / "adapter")).eval()
    same = []
    for p in PROMPTS:
        a, b = generate(final, tok, p), generate(trained, tok, p)
        same.append({"prompt": p, "final": tok.decode(a), "trained": tok.decode(b), "same": a == b})
    result["greedy"] = same
    result["same_first_8_tokens"] = sum(s["same"] for s in same)
    return result


def base_heldout() -> dict[str, object]:
    """Held-out loss (EVAL_DATA) of the model before training: bf16, and NF4 as qlora loads it."""
    import torch

    from sft.config import load_config
    from sft.data.pipeline import build_dataset
    from sft.evaluation.heldout import heldout_loss
    from sft.models import quantize
    from sft.models.load import load_model
    from sft.runtime import local
    from sft.training.prepare import prepare_data, prepare_model

    cfg = load_config(None, [*SETTINGS, *QLORA, f"--eval.data={EVAL_DATA}"])
    rt = local(cfg)
    data = prepare_data(cfg, STEPS, rt)
    held = build_dataset(cfg, data.tokenizer, "eval").examples
    bf16 = load_model(cfg.model, torch.bfloat16).eval()
    nf4 = load_model(cfg.model, torch.bfloat16, quantization=quantize.bnb_config(cfg, torch.bfloat16)).eval()
    a, b = heldout_loss(bf16, held, data.pad_id, cfg, rt)[0], heldout_loss(nf4, held, data.pad_id, cfg, rt)[0]
    adapted = prepare_model(cfg, nf4).eval()  # the adapters as the qlora run starts them
    c = heldout_loss(adapted, held, data.pad_id, cfg, rt)[0]
    assert a is not None and b is not None and c is not None
    return {"bf16_heldout": a, "nf4_heldout": b, "rel_diff": (b - a) / a, "adapted_heldout": c,
            "adapted_rel_diff": (c - a) / a, "lora_init": cfg.lora.init}


def main() -> int:
    out, what = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    empty = out / "empty.yaml"  # every other setting is on the command line
    empty.write_text(json.dumps({"eval": {"data": [{"path": str(EVAL_DATA)}]}}) + "\n")
    if what in ("lora", "qlora"):
        method = QLORA if what == "qlora" else ["--train.method=lora"]
        rc, peak = cli(["train", str(empty), *SETTINGS, *method, f"--output_dir={out / what}", "--overwrite"])
        info = {"rc": rc, "peak_rss_gb": round(peak, 3), "losses": losses(out / what)}
        if what == "qlora":
            info.update(base_bytes())
    elif what == "lora-matched":
        info = lora_matched(out, empty)
    elif what == "resume":
        run = out / "resume"
        args = ["train", str(empty), *SETTINGS, *QLORA, f"--output_dir={run}", "--train.save_every=10"]
        killed, _ = cli([*args, "--overwrite"], env={"SFT_DEBUG_KILL_AT_STEP": "25"})
        resumed, _ = cli([*args, "--resume"])
        ref = losses(out / "qlora")
        got = losses(run)
        info = {"killed_rc": killed, "resumed_rc": resumed, "equal": got == ref, "n": len(got),
                "first_diff": next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)}
    elif what == "base":
        info = base_heldout()
    else:
        info = compare(out)
    print(json.dumps(info, indent=1))
    (out / f"{what}.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
