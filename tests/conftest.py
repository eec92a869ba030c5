"""Shared fixtures: the real tokenizers of the packaged models and tiny random models built on them.

Tests are offline; tokenizers come from the installed model packages (converted once and cached).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smol_tok():
    from sft.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_tok():
    from sft.models.load import load_tokenizer

    return load_tokenizer("gemma-3-270m")


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama with SmolLM2's vocabulary, randomly initialised (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval().to(torch.float32)


def tiny_gemma(vocab_size: int = 262144, seed: int = 0):
    """A 2-layer Gemma 3 with Gemma's 262k vocabulary, randomly initialised (fp32)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval().to(torch.float32)


def make_cfg(tiny_dir, data_file, out, *extra):
    """The config of a tiny seeded CPU run (the tiny Llama on TINY_ROWS): fp32, lr 1e-3 constant,
    no warm-up, max_length 128, the data cache beside ``out``; ``extra`` overrides anything.
    Shared by the training tests (``from conftest import make_cfg``)."""
    from pathlib import Path

    from sft.config import load_config

    return load_config(None, [
        f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={out}", "--train.lr=1e-3",
        "--train.precision=fp32", "--train.warmup=0", "--train.schedule=constant", "--data.max_length=128",
        f"--data.cache_dir={Path(out).parent / 'cache'}", *extra,
    ])


@pytest.fixture()
def tiny_llama_model(smol_tok):
    return tiny_llama(len(smol_tok))


# Short chats for training-loop tests: sums with answers of varied length, and one multi-turn chat.
TINY_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " Indeed." * (a % 4)}]}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
] + [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, then red."}]}
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_tok):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(smol_tok)).save_pretrained(str(d), safe_serialization=True)
    smol_tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    return p
