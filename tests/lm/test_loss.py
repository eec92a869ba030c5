"""Chunked linear cross-entropy equals the plain one, values and gradients, with and without softcap."""

from __future__ import annotations

import pytest
import torch

from sft.lm.loss import linear_cross_entropy_sum, token_loss_sum


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


def test_no_grad_computes_no_gradient_pieces():
    """Held-out loss runs under no_grad: only the logits matmul may run, not the two gradient ones
    (the [V, H] weight gradient is the size of the embedding). Counted with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 16, generator=g, requires_grad=True)
    w = torch.randn(1000, 16, generator=g, requires_grad=True)  # requires grad, as in training
    t = torch.randint(0, 1000, (64,), generator=g)
    logits_flops = 2 * 64 * 16 * 1000

    with torch.no_grad(), FlopCounterMode(display=False) as quiet:
        loss = linear_cross_entropy_sum(h, w, t, chunk=16)
    assert not loss.requires_grad
    assert quiet.get_total_flops() == logits_flops

    # control: with grad mode on, the same call does the two gradient matmuls too (3x the FLOPs)
    with FlopCounterMode(display=False) as training:
        linear_cross_entropy_sum(h, w, t, chunk=16)
    assert training.get_total_flops() == 3 * logits_flops


def test_chunked_ce_bf16_close_to_fp32():
    """The bf16 path (bf16 hidden and weight, fp32 log-sum-exp and weight-gradient sum) stays
    within bf16 rounding of the fp32 reference; its gradients come back in bf16."""
    g = torch.Generator().manual_seed(0)
    h32 = torch.randn(300, 64, generator=g)
    w32 = torch.randn(2000, 64, generator=g) * 0.5
    t = (h32 @ w32.T).argmax(-1)  # confident targets, so a wrong one is visibly worse
    h = h32.bfloat16().requires_grad_()
    w = w32.bfloat16().requires_grad_()
    ours = linear_cross_entropy_sum(h, w, t, chunk=64)
    ours.backward()
    assert ours.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    h_ref, w_ref = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h_ref @ w_ref.T, t, reduction="sum")
    ref.backward()
    assert abs(float(ours.detach()) - float(ref.detach())) / float(ref.detach()) < 2e-3
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    assert rel(h.grad, h_ref.grad) < 1e-2 and rel(w.grad, w_ref.grad) < 1e-2
    # control: a wrong target is far outside that tolerance
    wrong = linear_cross_entropy_sum(h.detach(), w.detach(), (t + 1) % 2000, chunk=64)
    assert abs(float(wrong) - float(ref)) / float(ref) > 2e-2


def test_ignore_padded_chunks_equal_unpadded():
    """Static shapes: IGNORE slots (static_chunks' padding) add nothing to the loss or gradients."""
    from sft.lm.loss import static_chunks

    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, 8, generator=g)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 6), generator=g)
    keep = torch.rand(2, 6, generator=g) > 0.4
    idx, t = static_chunks(keep, targets, chunk=4)
    assert idx.numel() % 4 == 0 and int((t != -100).sum()) == int(keep.sum())
    hp = h.reshape(-1, 8).requires_grad_()
    padded = linear_cross_entropy_sum(hp.index_select(0, idx), w, t, chunk=4)
    padded.backward()
    gw_padded, gh_padded = w.grad.clone(), hp.grad.clone()
    w.grad = None
    hk = h.reshape(-1, 8).requires_grad_()
    plain = linear_cross_entropy_sum(hk[keep.reshape(-1)], w, targets[keep], chunk=4)
    plain.backward()
    torch.testing.assert_close(padded, plain)
    torch.testing.assert_close(w.grad, gw_padded)
    torch.testing.assert_close(hk.grad, gh_padded)
    # control: if a padding slot were trained (target 0 instead of IGNORE) the loss would change
    wrong = linear_cross_entropy_sum(hp.detach().index_select(0, idx), w.detach(), t.clamp(min=0), chunk=4)
    assert float(wrong) > float(plain.detach()) + 1.0
