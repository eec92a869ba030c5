"""The run's result: ``final/`` (an HF model directory plain transformers loads) and, for LoRA,
``adapter/`` (PEFT format). The chat template used in training is saved with the tokenizer, and
``generation_config.json`` stops on the end-of-turn token with a pad token that is not an end token.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from sft.config import Config
from sft.training.checkpoint import atomic_write_dir


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


def save_final(cfg: Config, model: Any, tokenizer: Any, template: str, out: Path) -> Any:
    """Write ``out/final`` (and ``out/adapter`` for LoRA); return the plain model that was saved."""
    from transformers import GenerationConfig

    tok, stops, pad = finalize_tokenizer(tokenizer, template)
    if cfg.train.method == "lora":
        atomic_write_dir(out / "adapter", lambda d: (model.save_pretrained(str(d), safe_serialization=True),
                                                     tok.save_pretrained(str(d))))
        model = model.merge_and_unload()
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
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
    model = model.to(torch.float32).eval()

    def write(d: Path) -> None:
        model.save_pretrained(str(d), safe_serialization=True)
        tok.save_pretrained(str(d))

    atomic_write_dir(out / "final", write)
    return model
