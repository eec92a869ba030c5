"""sft.training.checkpoint on one process: a checkpoint restores weights, optimizer state and
RNG exactly; only the newest ``keep`` stay; a folder killed between the two renames of a
replace comes back whole (``sft.atomic``). Resume through ``sft train`` is tested in
tests/training/test_loop.py and, under torchrun, tests/training/test_distributed.py."""

from __future__ import annotations

import random

import torch

from sft.atomic import atomic_write_dir, recover_swap
from sft.config import load_config
from sft.runtime import Runtime
from sft.training import checkpoint
from sft.training.optim import make_optimizer


def one_step(model, opt):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_save_then_load_restores_weights_optimizer_and_rng(tiny_llama_model, tmp_path):
    rt = Runtime()
    cfg = load_config(None, ["--train.lr=1e-3"])
    model = tiny_llama_model
    opt = make_optimizer(model, cfg.train)
    one_step(model, opt)
    torch.manual_seed(3)
    random.seed(3)
    path = checkpoint.save_checkpoint(tmp_path / "ck", 1, model, opt, {"total_steps": 9}, keep=2, rt=rt)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng_next = (torch.rand(3), random.random())
    one_step(model, opt)  # move everything on
    moved = next(iter(opt.state.values()))["exp_avg"].clone()
    state = checkpoint.load_checkpoint(path, model, opt, rt)
    assert state["step"] == 1 and state["total_steps"] == 9 and state["world_size"] == 1
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    assert not torch.equal(next(iter(opt.state.values()))["exp_avg"], moved)  # the optimizer went back too
    assert torch.equal(torch.rand(3), rng_next[0]) and random.random() == rng_next[1]


def test_only_the_newest_checkpoints_are_kept(tiny_llama_model, tmp_path):
    opt = make_optimizer(tiny_llama_model, load_config(None, []).train)
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path / "ck", step, tiny_llama_model, opt, {}, keep=2, rt=Runtime())
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "ck")] == ["step-2", "step-3"]
    (tmp_path / "ck" / ".tmp-step-4").mkdir()  # a save that died: not a checkpoint
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "ck")] == ["step-2", "step-3"]


def test_a_replace_killed_between_its_renames_is_recovered(tmp_path):
    target = tmp_path / "final"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("old"))
    target.rename(tmp_path / ".old-final")  # the first rename of a replace happened, the second did not
    assert not target.exists()
    recover_swap(target)
    assert (target / "a.txt").read_text() == "old"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("new"))  # control: a whole replace
    assert (target / "a.txt").read_text() == "new" and not (tmp_path / ".old-final").exists()


def test_a_checkpoint_from_before_a_key_resumes_at_the_old_behaviour(tmp_path):
    """A checkpoint written before ``train.bf16_rounding`` existed (its run rounded to nearest)
    resumes when the run says nearest, and otherwise stops with the flag that fixes it; a key that
    differs for real (lr) still stops the resume. Control: without the table the old checkpoint
    cannot be resumed at all."""
    import pytest

    from sft.errors import SftError

    old = {k: v for k, v in checkpoint.resume_config(load_config(None, [])).items() if k != "train.bf16_rounding"}
    saved = {"world_size": 1, "config": old}
    checkpoint.check_resume(tmp_path, saved, load_config(None, ["--train.bf16_rounding=nearest"]), Runtime())
    with pytest.raises(SftError, match=r"predates train.bf16_rounding.*--train.bf16_rounding=nearest"):
        checkpoint.check_resume(tmp_path, saved, load_config(None, []), Runtime())
    with pytest.raises(SftError, match=r"train.lr was"):
        checkpoint.check_resume(tmp_path, saved, load_config(None, ["--train.bf16_rounding=nearest", "--train.lr=1"]),
                                Runtime())
    table = checkpoint.ADDED_KEYS
    try:
        checkpoint.ADDED_KEYS = {}
        with pytest.raises(SftError, match=r"train.bf16_rounding was None"):
            checkpoint.check_resume(tmp_path, saved, load_config(None, ["--train.bf16_rounding=nearest"]), Runtime())
    finally:
        checkpoint.ADDED_KEYS = table
