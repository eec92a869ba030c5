"""Chunked linear cross-entropy equals the plain one, values and gradients, with and without softcap."""

from __future__ import annotations

import pytest
import torch

from sft.training.loss import linear_cross_entropy_sum, token_loss_sum


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_ce_matches_reference(softcap):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(101, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 101, (37,), generator=g)
    ours = linear_cross_entropy_sum(h, w, t, softcap=softcap, chunk=5)
    (ours * 0.7).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = h @ w.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits, t, reduction="sum")
    (ref * 0.7).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)
    # control: a wrong target changes the loss, so the comparison above has teeth
    wrong = linear_cross_entropy_sum(h.detach(), w.detach(), (t + 1) % 101, softcap=softcap, chunk=5)
    assert abs(float(wrong) - float(ref.detach())) > 1e-2


def test_token_loss_sum_matches_model_loss(smol_tok):
    from conftest import tiny_llama

    model = tiny_llama(len(smol_tok))
    ids = torch.tensor([[1, 5, 9, 13, 200, 7, 2, 44]])
    labels = torch.tensor([[-100, -100, -100, 13, 200, 7, 2, -100]])
    loss_sum, n = token_loss_sum(model, {"input_ids": ids, "labels": labels})
    ref = model(input_ids=ids, labels=labels).loss  # transformers' mean over the same targets
    assert n == 4
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-5)
