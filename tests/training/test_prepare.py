"""NEFTune (sft.training.prepare.add_neftune): noise on the input embeddings while training only,
of the documented size, and really on in `sft train`; each check with a control that fails for a
no-op hook."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_cfg as shared_cfg
from conftest import tiny_llama
from sft.training.loop import train
from sft.training.prepare import add_neftune


def embeddings_out(model, ids):
    captured = {}
    handle = model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: captured.setdefault("x", out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return captured["x"]


def test_neftune_noise_in_training_only_and_of_the_documented_size(smol_tok):
    model = tiny_llama(len(smol_tok))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    clean = model.get_input_embeddings()(ids).detach()
    alpha = 5.0
    handle = add_neftune(model, alpha)
    model.train()
    noisy = embeddings_out(model, ids)
    noise = noisy - clean
    bound = alpha / math.sqrt(ids.shape[1] * clean.shape[-1])  # alpha / sqrt(L * d)
    assert float(noise.abs().max()) <= bound + 1e-6
    assert float(noise.abs().max()) > 0.9 * bound  # uniform on [-bound, bound]: reaches near the edge
    assert float(noise.abs().mean()) == pytest.approx(bound / 2, rel=0.2)
    model.eval()
    assert torch.equal(embeddings_out(model, ids), clean)  # no noise at evaluation
    handle.remove()
    model.train()
    assert torch.equal(embeddings_out(model, ids), clean)  # control: without the hook, no noise


def make_cfg(tiny_dir, data_file, out, *extra):
    return shared_cfg(tiny_dir, data_file, out, "--train.max_steps=2", "--train.batch_size=2", *extra)


def test_sft_train_with_neftune_trains_on_noisy_embeddings(tiny_dir, data_file, tmp_path):
    """train.neftune_alpha changes the training losses (a no-op would leave them equal to the
    plain run's), and a run with the same alpha and seed reproduces them exactly."""
    plain = train(make_cfg(tiny_dir, data_file, tmp_path / "plain"), progress=False).losses
    noisy = train(make_cfg(tiny_dir, data_file, tmp_path / "nef", "--train.neftune_alpha=5"), progress=False).losses
    again = train(make_cfg(tiny_dir, data_file, tmp_path / "nef2", "--train.neftune_alpha=5"), progress=False).losses
    assert noisy == again  # seeded
    assert all(abs(a - b) > 1e-6 for a, b in zip(noisy, plain))
