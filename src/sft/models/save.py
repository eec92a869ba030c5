"""The run's result: ``final/`` (an HF model directory plain transformers loads) and, for LoRA and
QLoRA, ``adapter/`` (PEFT format; QLoRA's ``final/`` merges it into the dequantized 4-bit base). The chat template used in training is saved with the tokenizer, and
``generation_config.json`` stops on the end-of-turn token with a pad token that is not an end token.
``final/`` is written in ``train.save_dtype``: by default the model's own dtype (bf16 for the packaged
GGUF models), not the fp32 the weights are trained in, so it is the size users expect.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from sft.atomic import atomic_write_dir
from sft.config import Config
from sft.errors import SftError

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def source_dtype(model: str, revision: str | None = None) -> str:
    """The dtype ``model`` ships in: ``dtype`` (or ``torch_dtype``) of its config.json; bf16 for a
    GGUF source such as the packaged models (their weights are dequantized from 4-bit)."""
    from sft.models.load import resolve

    try:
        src = resolve(model, revision)
    except SftError:  # the base moved since training: keep full precision
        return "fp32"
    if src.is_gguf:
        return "bf16"
    try:
        hf = json.loads((src.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "fp32"
    name = hf.get("dtype") or hf.get("torch_dtype") or (hf.get("text_config") or {}).get("dtype")
    return _HF_DTYPES.get(str(name), "fp32")


def save_dtype(cfg: Config) -> torch.dtype:
    """``train.save_dtype`` as a torch dtype; ``auto`` is the base model's own dtype."""
    name = getattr(cfg.train, "save_dtype", "auto")
    if name == "auto":
        name = source_dtype(cfg.model, getattr(cfg, "revision", None))
    return SAVE_DTYPES[name]


def pick_pad_id(tokenizer: Any, stop_ids: list[int]) -> int:
    """A pad id that is not an end token (SmolLM2's pad == eos would make generation stop-blind)."""
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id]
    candidates += [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<|endoftext|>", "<unk>")]
    candidates += list(getattr(tokenizer, "all_special_ids", []))
    for c in candidates:
        if isinstance(c, int) and c >= 0 and c not in stop_ids:
            return c
    return next(i for i in range(len(tokenizer)) if i not in stop_ids)


def finalize_tokenizer(tokenizer: Any, template: str) -> tuple[Any, list[int], int]:
    """A copy of ``tokenizer`` carrying ``template``, plus the stop ids and a non-end pad id."""
    from sft.data.chat import stop_token_ids

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    stops = stop_token_ids(tok, template)
    pad = pick_pad_id(tok, stops)
    tok.pad_token = tok.convert_ids_to_tokens(pad)
    return tok, stops, pad


def attach_generation_config(model: Any, tok: Any, stops: list[int], pad: int) -> None:
    """Make ``model`` stop on the end-of-turn ids and pad with a non-end token when it generates."""
    from transformers import GenerationConfig

    model.config.use_cache = True
    model.config.pad_token_id = pad
    model.config.eos_token_id = stops[0] if len(stops) == 1 else stops
    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=stops,
        pad_token_id=pad,
        do_sample=False,
        max_new_tokens=256,
    )
    model.generation_config = gen


def cast_for_saving(model: Any, dtype: torch.dtype, cfg: Config, masters: dict[str, torch.Tensor] | None = None) -> Any:
    """``model`` in ``dtype``, in place. ``masters`` (a bf16 run's fp32 master weights, by parameter
    name) replace their bf16 copies first: the saved weights are the trained ones, not a rounding of
    them. fp32 weights go to bf16 by ``train.bf16_rounding``: stochastic (seeded by ``train.seed``)
    keeps on average the updates smaller than half a bf16 step that rounding to nearest would undo
    (``sft.lm.rounding``); other casts are torch's (round to nearest)."""
    if masters:
        model.float()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, m in masters.items():
                params[name].copy_(m)
    if dtype == torch.bfloat16 and cfg.train.bf16_rounding == "stochastic":
        from sft.lm.rounding import stochastic_round_

        g = torch.Generator().manual_seed(cfg.train.seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.dtype == torch.float32:
                    p.data = stochastic_round_(torch.empty_like(p, dtype=torch.bfloat16), p.data, g)
    return model.to(dtype)


def save_final(cfg: Config, model: Any, tokenizer: Any, template: str, out: Path,
               masters: dict[str, torch.Tensor] | None = None) -> Any:
    """Write ``out/final`` (and ``out/adapter`` for LoRA); return the plain model that was saved,
    in fp32 but holding exactly the saved values (so an evaluation after training sees ``final/``).
    ``masters``: see ``cast_for_saving``."""
    tok, stops, pad = finalize_tokenizer(tokenizer, template)
    if cfg.train.method in ("lora", "qlora"):
        atomic_write_dir(out / "adapter", lambda d: (model.save_pretrained(str(d), safe_serialization=True),
                                                     tok.save_pretrained(str(d))))
        if cfg.train.method == "qlora":  # the dequantized NF4 base + the adapters: the model that trained
            from sft.models.quantize import merged

            model = merged(model)
        else:
            model = model.merge_and_unload()
    if getattr(model, "is_activation_checkpointing", False):  # transformers 5.x's names (the old ones warn)
        model.activation_checkpointing_disable()
    attach_generation_config(model, tok, stops, pad)
    model = cast_for_saving(model, save_dtype(cfg), cfg, masters).eval()

    def write(d: Path) -> None:
        model.save_pretrained(str(d), safe_serialization=True)
        tok.save_pretrained(str(d))

    atomic_write_dir(out / "final", write)
    return model.to(torch.float32)
