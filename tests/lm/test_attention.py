"""Padding-free (cu_seqlens) attention: packed rows flattened to one sequence give each document
the logits it gets alone, for Llama and Gemma 3 (sliding window); a control in which one document
can see another fails that check. Runs the CPU path of sft.lm.attention (per-document SDPA);
the CUDA kernel call (torch's varlen_attn) is exercised only on a GPU (bench/gpu_side_by_side.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from sft.lm import attention
from sft.lm.loss import token_loss_sum

DOCS = (37, 5, 20, 2)  # row 1: docs of 37 and 5 (+ 6 padding), row 2: 20 and 2 (+ 26 padding)


def packed_rows(vocab: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Two packed rows of width 48, padding as a segment of its own (as collate_packed_rows does)."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, vocab, (n,), generator=g) for n in DOCS]
    rows, pos = [], []
    for pair in (docs[:2], docs[2:]):
        pad = 48 - sum(len(d) for d in pair)
        rows.append(torch.cat([*pair, torch.zeros(pad, dtype=torch.long)]))
        pos.append(torch.cat([*(torch.arange(len(d)) for d in pair), torch.arange(pad)]))
    return {"input_ids": torch.stack(rows), "position_ids": torch.stack(pos)}, docs


def models(smol_tok):
    from conftest import tiny_gemma, tiny_llama

    # Gemma's sliding window (16) is shorter than the 37-token document, so the window matters
    return {"llama": tiny_llama(len(smol_tok)), "gemma3": tiny_gemma(vocab_size=len(smol_tok))}


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_packed_equals_separate(smol_tok, name):
    model = models(smol_tok)[name]
    batch, docs = packed_rows(model.config.vocab_size)
    varlen = attention.use_varlen(copy.deepcopy(model))
    assert attention.is_varlen(varlen) and not attention.is_varlen(model)
    with torch.no_grad():
        flat = attention.flatten_packed(batch)
        assert flat["cu_seq_lens_q"].tolist() == [0, 37, 42, 48, 68, 70, 96]
        packed = varlen(**flat, use_cache=False).logits[0]  # [96, V]
        alone = [model(input_ids=d[None], use_cache=False).logits[0] for d in docs]
        starts = [0, 37, 48, 68]
        for d, s, ref in zip(docs, starts, alone, strict=True):
            torch.testing.assert_close(packed[s : s + len(d)], ref, rtol=1e-4, atol=1e-5)

        # control: the same flattened tokens as ONE document (a packed document sees another)
        leaky = dict(flat, cu_seq_lens_q=torch.tensor([0, 96], dtype=torch.int32))
        leaky["cu_seq_lens_k"], leaky["max_length_q"] = leaky["cu_seq_lens_q"], 96
        seen = varlen(**leaky, use_cache=False).logits[0]
        assert (seen[37:42] - alone[1]).abs().max() > 1e-2


def test_token_loss_sum_padding_free_equals_sdpa(smol_tok):
    """The training loss of packed rows through the padding-free path equals transformers' sdpa
    with its block-diagonal mask (the CPU path), values and gradients."""
    from conftest import tiny_llama

    model = tiny_llama(len(smol_tok))
    batch, _ = packed_rows(model.config.vocab_size)
    labels = batch["input_ids"].clone()
    labels[:, :3] = -100
    labels[0, 42:] = -100
    labels[1, 22:] = -100
    batch["labels"] = labels
    varlen = attention.use_varlen(copy.deepcopy(model))
    ref, n = token_loss_sum(model, batch)
    ours, m = token_loss_sum(varlen, batch)
    assert n == m
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ref.backward()
    ours.backward()
    for (name, a), b in zip(model.named_parameters(), varlen.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_batch_keeps_its_padding_mask(smol_tok):
    """Held-out loss uses right-padded batches with an attention_mask: same loss as sdpa."""
    from conftest import tiny_llama

    model = tiny_llama(len(smol_tok))
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
             "position_ids": torch.arange(10).expand(2, 10)}
    varlen = attention.use_varlen(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(token_loss_sum(varlen, batch)[0], token_loss_sum(model, batch)[0])


def test_train_with_varlen_equals_sdpa(tiny_dir, data_file, tmp_path, monkeypatch):
    """``train.attention: varlen`` (forced on CPU) through `sft train`: the same losses as sdpa, and
    final/ loads with plain transformers (the custom attention name is not saved)."""
    import json

    from transformers import AutoModelForCausalLM

    from sft.config import load_config
    from sft.training.loop import train

    def run(out, choice):
        return train(load_config(None, [
            f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={out}", "--train.lr=1e-3",
            "--train.precision=fp32", "--train.warmup=0", "--data.max_length=128", "--train.batch_size=4",
            "--train.max_steps=3", f"--data.cache_dir={tmp_path / 'cache'}", f"--train.attention={choice}",
        ]), progress=False)

    calls = []
    per_document = attention._per_document
    monkeypatch.setattr(attention, "_per_document", lambda *a: calls.append(1) or per_document(*a))
    ref = run(tmp_path / "s", "sdpa")
    assert not calls
    ours = run(tmp_path / "v", "varlen")
    assert calls  # the padding-free path really ran
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "v" / "final" / "config.json").read_text()))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "v" / "final"))
