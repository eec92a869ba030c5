"""Padding-free attention: packed rows give each document the logits (and gradients) it gets alone,
for Llama and Gemma 3 (sliding window), through both paths of sft.lm.attention: the flattened
cu_seqlens path (per-document SDPA on a CPU) and the CPU training path, ``[B, T]`` rows whose
documents come from position_ids (sft.lm.doc_attention); a control in which one document can see
another fails each check. The CUDA kernel itself (torch's varlen_attn) runs only on a GPU
(bench/gpu_side_by_side.py); how sft calls it, across the kernel's signatures in torch 2.10-2.12+, is
checked here against CPU stand-ins."""

from __future__ import annotations

import copy

import pytest
import torch

from sft.lm import attention
from sft.lm.doc_attention import doc_attention, documents
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
    monkeypatch.setattr(attention, "doc_attention", lambda *a: calls.append(1) or doc_attention(*a))
    ref = run(tmp_path / "s", "sdpa")
    assert not calls
    ours = run(tmp_path / "v", "varlen")
    assert calls  # the padding-free path really ran
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    assert attention.NAME not in json.dumps(json.loads((tmp_path / "v" / "final" / "config.json").read_text()))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "v" / "final"))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_cpu_rows_equal_separate_documents(smol_tok, name):
    """The CPU path: packed ``[B, T]`` rows (not flattened) through the varlen model give each
    document its logits alone; the control (position_ids that never restart: one document per
    row) lets the second document see the first."""
    model = models(smol_tok)[name]
    batch, docs = packed_rows(model.config.vocab_size)
    varlen = attention.use_varlen(copy.deepcopy(model))
    assert not attention.flattens(varlen, batch)  # a CPU batch keeps its rows
    with torch.no_grad():
        rows = varlen(**batch, use_cache=False).logits  # [2, 48, V]
        alone = [model(input_ids=d[None], use_cache=False).logits[0] for d in docs]
        for (r, s), d, ref in zip([(0, 0), (0, 37), (1, 0), (1, 20)], docs, alone, strict=True):
            torch.testing.assert_close(rows[r, s : s + len(d)], ref, rtol=1e-4, atol=1e-5)
        leaky = varlen(input_ids=batch["input_ids"], position_ids=torch.arange(48).expand(2, 48), use_cache=False)
        assert (leaky.logits[0, 37:42] - alone[1]).abs().max() > 1e-2


def _dense(q, k, v, position_ids, scale, window=0):
    """Reference: SDPA with the dense block-diagonal causal (and windowed) mask, output [B, T, H, D]."""
    doc = (position_ids == 0).cumsum(-1)
    t = q.shape[2]
    i = torch.arange(t)
    mask = (doc[:, :, None] == doc[:, None, :]) & (i[None, :] <= i[:, None])
    if window:
        mask &= i[None, :] > i[:, None] - window
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype,window", [(torch.float32, 0), (torch.float32, 16), (torch.bfloat16, 0)])
def test_doc_attention_equals_dense_mask_values_and_gradients(dtype, window):
    """The operator against SDPA with the dense mask (what the sdpa path computes), forward and
    backward, grouped-query heads (6 query heads on 2 key/value heads); bf16 within bf16's
    resolution (the operator computes in fp32, the reference in bf16). Control: documents shifted
    by one token give different values."""
    batch, _ = packed_rows(1000)
    pos = batch["position_ids"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 48, 8, generator=g).to(dtype).requires_grad_() for h in (6, 2, 2))
    grad = torch.randn(2, 48, 6, 8, generator=g).to(dtype)
    ours = doc_attention(q, k, v, pos, 0.3, window)[0]
    (dq, dk, dv) = torch.autograd.grad(ours, (q, k, v), grad)
    ref = _dense(q, k, v, pos, 0.3, window)
    (rq, rk, rv) = torch.autograd.grad(ref, (q, k, v), grad)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    for a, b in ((ours, ref), (dq, rq), (dk, rk), (dv, rv)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **tol)
    shifted = torch.roll(pos, 1, dims=1)
    shifted[:, 0] = 0
    assert (doc_attention(q, k, v, shifted, 0.3, window)[0] - ours).abs().max() > 0.1


def test_documents_of_rows():
    assert documents(torch.tensor([[0, 1, 0, 0, 1, 2]])) == [[(0, 2), (2, 3), (3, 6)]]
    assert documents(torch.tensor([[3, 4, 0, 1]])) == [[(0, 2), (2, 4)]]  # a row that starts mid-document


def test_generation_through_the_varlen_model_equals_sdpa(smol_tok, monkeypatch):
    """After training the varlen model generates in-process (evaluation): a left-padded batch and
    KV-cache steps go to transformers' sdpa with its own masks, so every step's logits equal sdpa's.
    The control (no mask ever: cached padding keys are attended to) gives other logits."""
    from conftest import tiny_llama

    model = tiny_llama(len(smol_tok)).eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 2, "output_logits": True,
          "return_dict_in_generate": True}

    def generate(m):
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, **kw)
        return out.sequences, torch.stack(out.logits)

    ref_tokens, ref = generate(model)
    tokens, logits = generate(attention.use_varlen(copy.deepcopy(model)).eval())
    assert torch.equal(tokens, ref_tokens) and ref_tokens.shape == (2, 16)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(attention, "mask_function", lambda *a, **k: None)
    broken = generate(attention.use_varlen(copy.deepcopy(model)).eval())[1]
    assert (broken[1:, 1] - ref[1:, 1]).abs().max() > 1e-3  # the padded row, at the cached steps


def _fake_varlen(q, k, v, cu, scale, left, causal, gqa):
    """CPU stand-in for torch's varlen_attn kernel: [N, H, D] documents by cu, window (left, 0)."""
    if not gqa:
        assert q.shape[1] == k.shape[1], "this version has no grouped-query attention"
    outs = []
    for s, e in zip(cu.tolist(), cu.tolist()[1:], strict=False):
        i = torch.arange(e - s)
        keep = torch.ones(e - s, e - s, dtype=torch.bool)
        if causal:
            keep &= i[None, :] <= i[:, None]
        if left >= 0:
            keep &= i[None, :] >= i[:, None] - left
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), attn_mask=keep,
            scale=scale, enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outs)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _fake_varlen(query, key, value, cu_seq_q, None, -1, is_causal, gqa=False)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    return _fake_varlen(query, key, value, cu_seq_q, scale, window_size[0], window_size[1] == 0, gqa=False)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    return _fake_varlen(query, key, value, cu_seq_q, scale, window_size[0], window_size[1] == 0, gqa=enable_gqa)


@pytest.mark.parametrize("fn", [varlen_2_10, varlen_2_11, varlen_2_12])
@pytest.mark.parametrize("window", [None, 16])
def test_call_varlen_attn_across_torch_versions(fn, window):
    """The CUDA kernel's call adapts to varlen_attn's signature in torch 2.10, 2.11 and 2.12+ (GQA
    repeated where it has no enable_gqa; None where it cannot window or scale): what it returns
    equals SDPA per document. Control: the same kernel without causality differs."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, 4, 8, generator=g)  # [N, Hq, D], two key/value heads
    k, v = torch.randn(64, 2, 8, generator=g), torch.randn(64, 2, 8, generator=g)
    cu = torch.tensor([0, 37, 42, 64], dtype=torch.int32)
    want = attention._per_document(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, None, window)
    got = attention.call_varlen_attn(fn, q, k, v, cu, 37, None, window)
    if fn is varlen_2_10 and window:
        assert got is None  # no window in that version: SDPA per document instead
    else:
        torch.testing.assert_close(got, want.transpose(0, 1))
    assert attention.call_varlen_attn(varlen_2_10, q, k, v, cu, 37, 0.3, None) is None  # fixed 1/sqrt(d) only
    scaled = attention.call_varlen_attn(varlen_2_11, q, k, v, cu, 37, 0.3, None)
    torch.testing.assert_close(scaled, attention._per_document(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, 0.3, None).transpose(0, 1))
    leaky = varlen_2_12(q, k, v, cu, cu, 37, 37, window_size=(-1, -1), enable_gqa=True)
    assert (leaky - want.transpose(0, 1)).abs().max() > 0.1
