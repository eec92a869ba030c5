"""Does the exported GGUF behave like ``final/``? Round trip through llama.cpp, measured.

For a run directory, export ``--to gguf`` in each quant, run every file with llama.cpp
(llama-cpp-python) and ``final/`` with transformers on the same held-out prompts (token ids from
sft's template code), and report per quant:

- next-token logits at the end of each prompt: max |difference| against ``final/`` (fp32 compute),
  and top-1 agreement; for f16 also against ``final/`` with its weights rounded to fp16 (what the
  f16 file holds), which isolates llama.cpp's own arithmetic;
- greedy continuations: equal token for token (up to ``--max-new-tokens``), and whether llama.cpp
  stopped on the end-of-turn token (llama.cpp's own end-of-generation set, from the GGUF);
- llama.cpp's tokenization of the rendered prompt equals transformers' ids;
- file size and export time.

    python bench/export_agreement.py RUN_DIR [--quants f16,q8_0,q4_k_m] [--prompts eval.jsonl] [--n 10]

The slow tests (tests/export/test_export.py) call ``measure`` and assert on its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class QuantResult:
    quant: str
    path: str
    bytes: int
    export_s: float
    prompts: int = 0
    max_abs_logit_diff: float = 0.0  # vs final/ (fp32 compute), max over prompts and vocabulary
    max_abs_logit_diff_rounded: float | None = None  # f16 only: vs final/ with weights rounded to fp16
    top1_agree: int = 0
    greedy_equal: int = 0
    stopped_at_eot: int = 0  # llama.cpp's continuation ended on the end-of-turn token
    hf_stopped_at_eot: int = 0
    tokenization_equal: int = 0
    first_divergence: list[int | None] = field(default_factory=list)  # per prompt: index of the first different token


def load_prompts(path: Path, n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` conversations of a JSONL file of ``{"messages": [...]}``, each cut before its
    last assistant turn (the reply the model is to write)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append(msgs[:last])
        if len(out) == n:
            break
    return out


def _llama(path: Path) -> Any:
    """llama.cpp on ``path`` with ``--no-repack`` (``use_extra_bufts = False``): on this machine's
    AMX CPU the repacked (AMX/AVX-512) weight layout of llama-cpp-python 0.3.36 segfaults on the
    first decode of a q8_0 or q4_k_m file; f16 is not repacked either way."""
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama

    if not getattr(C.llama_model_default_params, "_sft_no_repack", False):
        default = C.llama_model_default_params

        def no_repack() -> Any:
            params = default()
            params.use_extra_bufts = False
            return params

        no_repack._sft_no_repack = True  # type: ignore[attr-defined]
        C.llama_model_default_params = no_repack
    return Llama(str(path), n_ctx=2048, logits_all=True, verbose=False, n_threads=max(1, (os.cpu_count() or 2)))


def llama_next_logits(llm: Any, ids: list[int]) -> Any:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)


def llama_greedy(llm: Any, ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding with llama.cpp's sampler, ending on a token llama.cpp calls end-of-generation."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out: list[int] = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(t))
        if llama_cpp.llama_vocab_is_eog(vocab, t) or len(out) >= max_new:
            break
    return out


def hf_greedy(model: Any, ids: list[int], max_new: int, stops: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=stops)
    return [int(t) for t in out[0, len(ids):]]


def hf_next_logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(run_dir: Path, quants: list[str], prompts: list[list[dict[str, str]]], max_new: int = 48,
            out_dir: Path | None = None) -> dict[str, Any]:
    """Export ``run_dir`` in each quant and compare each file with ``final/``; see the module doc."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from sft.data.chat import prompt_ids
    from sft.data.types import Message
    from sft.export.run import export

    final = run_dir / "final"
    tok = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    stops = list(GenerationConfig.from_pretrained(str(final)).eos_token_id)
    eot = stops[0]
    ids_list = [prompt_ids([Message(m["role"], m["content"]) for m in p], tok, tok.chat_template) for p in prompts]
    texts = [tok.decode(ids) for ids in ids_list]
    hf_logits = [hf_next_logits(model, ids) for ids in ids_list]
    hf_out = [hf_greedy(model, ids, max_new, stops) for ids in ids_list]
    rounded = None
    if "f16" in quants:  # final/ as the f16 file holds it: every weight rounded to fp16
        rounded = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
        for p in rounded.parameters():
            p.data = p.data.half().float()
    out_dir = out_dir or run_dir / "export"
    results = []
    for q in quants:
        path = out_dir / f"{run_dir.name}-{q}.gguf"
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        exp = export(str(run_dir), "gguf", q, out=str(path))
        r = QuantResult(q, str(path), exp.bytes, round(time.perf_counter() - t0, 1), prompts=len(ids_list))
        llm = _llama(path)
        diffs, rdiffs = [], []
        for i, ids in enumerate(ids_list):
            ll = llama_next_logits(llm, ids)
            diffs.append(float(np.abs(ll - hf_logits[i]).max()))
            r.top1_agree += int(ll.argmax() == hf_logits[i].argmax())
            if rounded is not None and q == "f16":
                rdiffs.append(float(np.abs(ll - hf_next_logits(rounded, ids)).max()))
            lt = llm.tokenize(texts[i].encode("utf-8"), add_bos=False, special=True)
            r.tokenization_equal += int(list(lt) == ids)
            out = llama_greedy(llm, ids, max_new)
            r.greedy_equal += int(out == hf_out[i])
            r.first_divergence.append(_first_divergence(out, hf_out[i]))
            r.stopped_at_eot += int(bool(out) and out[-1] == eot)
            r.hf_stopped_at_eot += int(bool(hf_out[i]) and hf_out[i][-1] == eot)
        r.max_abs_logit_diff = round(max(diffs), 4)
        if rdiffs:
            r.max_abs_logit_diff_rounded = round(max(rdiffs), 4)
        llm.close()
        results.append(r)
        print(_row(r), flush=True)
    final_bytes = sum(f.stat().st_size for f in final.glob("*.safetensors"))
    saved = json.loads((final / "config.json").read_text()).get("dtype")
    return {"run": str(run_dir), "final_dtype": str(saved), "final_bytes": final_bytes,
            "max_new_tokens": max_new, "eot_id": eot, "results": [asdict(r) for r in results]}


def _row(r: QuantResult) -> str:
    rounded = f" (vs fp16-rounded final/: {r.max_abs_logit_diff_rounded})" if r.max_abs_logit_diff_rounded is not None else ""
    return (f"| {r.quant} | {r.bytes / 1e6:.1f} MB | {r.export_s} s | {r.max_abs_logit_diff}{rounded} | "
            f"{r.top1_agree}/{r.prompts} | {r.greedy_equal}/{r.prompts} | {r.stopped_at_eot}/{r.prompts} | "
            f"{r.tokenization_equal}/{r.prompts} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--quants", default="f16,q8_0,q4_k_m")
    ap.add_argument("--prompts", type=Path, default=Path(__file__).resolve().parents[1] / "examples/demo/eval.jsonl")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    print("| quant | size | export | max abs logit diff | top-1 | greedy equal | llama.cpp stops at EOT | tokenization |")
    print("|---|---|---|---|---|---|---|---|")
    res = measure(args.run_dir, args.quants.split(","), load_prompts(args.prompts, args.n), args.max_new_tokens)
    res["machine"] = f"{os.cpu_count()}-core CPU, torch {__import__('torch').__version__}"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    print(f"final/: {res['final_bytes'] / 1e6:.1f} MB ({res['final_dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
