"""Pure-bf16 training: what ``auto`` picks, the fp32 master weights of ``MasterAdamW``, and a tiny
bf16 run that trains, each with a control that shows the check can fail."""

from __future__ import annotations

import pytest
import torch

from sft import runtime
from sft.config import load_config
from sft.training import precision
from sft.training.optim import MasterAdamW, make_optimizer


def bf16_grads(shape, steps, seed=0):
    """Gradients that bf16 holds exactly, so bf16 and fp32 weights see the very same numbers."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).bfloat16().float() for _ in range(steps)]


def test_auto_picks_bf16_only_where_native(monkeypatch):
    cfg = load_config(None, ["--model=x", "--data.train=x.jsonl"])
    assert cfg.train.precision == "auto"
    monkeypatch.setattr(runtime, "bf16_supported", lambda: True)
    assert runtime.resolve_precision(cfg) == "bf16" and precision.train_dtype(cfg) == torch.bfloat16
    assert runtime.local(cfg).precision == "bf16"
    monkeypatch.setattr(runtime, "bf16_supported", lambda: False)
    assert runtime.resolve_precision(cfg) == "fp32" and precision.train_dtype(cfg) == torch.float32
    assert runtime.local(cfg).precision == "fp32"
    cfg.train.precision = "bf16"
    assert runtime.resolve_precision(cfg) == "bf16"  # an explicit choice is kept


def test_master_adamw_follows_fp32_adamw_exactly():
    """With the same gradients, the fp32 master of a bf16 weight takes exactly torch AdamW's fp32
    steps, and the bf16 weight is that master rounded to nearest."""
    torch.manual_seed(0)
    w32 = torch.nn.Parameter(torch.randn(64, 32))
    w16 = torch.nn.Parameter(w32.detach().bfloat16())
    w32.data = w16.detach().float()  # start from the same (bf16-representable) values
    kw = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    ref = torch.optim.AdamW([w32], fused=True, **kw)
    ours = MasterAdamW([w16], **kw)
    for g in bf16_grads(w32.shape, 20):
        w32.grad, w16.grad = g.clone(), g.bfloat16()
        ref.step()
        ours.step()
    master = ours.state[w16]["master"]
    assert master.dtype == torch.float32 and w16.dtype == torch.bfloat16
    assert torch.equal(master, w32.detach())
    assert torch.equal(w16.detach(), w32.detach().bfloat16())


def test_small_updates_survive_only_with_master_weights():
    """lr 1e-5 on weights near 1: each step is ~1/1000 of a bf16 step of the weight. Naive bf16 AdamW
    (the control) rounds every update away; the master copy accumulates them."""
    start = torch.ones(256, dtype=torch.bfloat16) + torch.linspace(0, 0.5, 256).bfloat16()
    naive_w = torch.nn.Parameter(start.clone())
    ours_w = torch.nn.Parameter(start.clone())
    naive = torch.optim.AdamW([naive_w], lr=1e-5, weight_decay=0.0)
    ours = MasterAdamW([ours_w], lr=1e-5, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(600):  # a constant gradient: Adam moves each weight by ~lr per step, 6e-3 in all
        naive_w.grad = torch.ones_like(naive_w)
        ours_w.grad = torch.ones_like(ours_w)
        naive.step()
        ours.step()
    assert torch.equal(naive_w.detach(), start)  # control: nothing moved
    moved = (start.float() - ours_w.detach().float()).mean()
    assert 4e-3 < float(moved) < 8e-3


def test_master_state_round_trips_in_fp32():
    """A checkpoint's optimizer state restores the master in fp32 (torch would cast it to bf16), so
    steps after a resume equal the uninterrupted ones."""
    torch.manual_seed(0)
    grads = bf16_grads((16, 8), 10)
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}

    def run(resume_at):
        w = torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).bfloat16())
        opt = MasterAdamW([w], **kw)
        for i, g in enumerate(grads):
            if i == resume_at:
                sd = {k: v for k, v in opt.state_dict().items()}
                w = torch.nn.Parameter(w.detach().clone())
                opt = MasterAdamW([w], **kw)
                opt.load_state_dict(sd)
                assert opt.state[w]["master"].dtype == torch.float32
            w.grad = g.bfloat16()
            opt.step()
        return opt.state[w]["master"]

    straight = run(resume_at=None)
    assert torch.equal(run(resume_at=5), straight)
    # control: dropping the master on resume (re-deriving it from the bf16 weight) changes the result
    broken = MasterAdamW.load_state_dict

    def lossy(self, sd):
        broken(self, sd)
        for st in self.state.values():
            st["master"] = st["master"].bfloat16().float()

    MasterAdamW.load_state_dict = lossy  # type: ignore[method-assign]
    try:
        assert not torch.equal(run(resume_at=5), straight)
    finally:
        MasterAdamW.load_state_dict = broken  # type: ignore[method-assign]


def test_to_train_dtype_keeps_rotary_frequencies_fp32(tiny_llama_model):
    cfg = load_config(None, ["--model=x", "--data.train=x.jsonl", "--train.precision=bf16"])
    m = precision.to_train_dtype(tiny_llama_model, cfg)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    inv = dict(m.named_buffers())["model.rotary_emb.inv_freq"]
    assert inv.dtype == torch.float32
    opt = make_optimizer(m, cfg.train)
    assert isinstance(opt, MasterAdamW)
    cfg32 = load_config(None, ["--model=x", "--data.train=x.jsonl", "--train.precision=fp32"])
    assert type(make_optimizer(m.float(), cfg32.train)) is torch.optim.AdamW


@pytest.mark.parametrize("precision_name", ["bf16"])
def test_bf16_run_trains_and_tracks_fp32(tiny_dir, data_file, tmp_path, precision_name):
    """``sft train`` with ``precision: bf16`` keeps bf16 weights, learns, and its losses stay close to
    the fp32 run's (lr 1e-3, 6 steps of a tiny model)."""
    from conftest import make_cfg as shared_cfg
    from sft.training.loop import train

    def make_cfg(out, *extra):
        return shared_cfg(tiny_dir, data_file, out, "--eval.before_after=false", *extra)

    common = ["--train.batch_size=4", "--train.max_steps=6", "--data.packing=true"]
    fp32 = train(make_cfg(tmp_path / "f", *common), progress=False)
    cfg = make_cfg(tmp_path / "b", *common, f"--train.precision={precision_name}")
    bf16 = train(cfg, progress=False)
    assert bf16.losses[-1] < bf16.losses[0] - 0.05  # it learns
    for a, b in zip(fp32.losses, bf16.losses, strict=True):
        assert abs(a - b) / a < 0.02


def test_compile_auto_only_where_it_pays(monkeypatch):
    from sft.training.precision import AUTO_COMPILE_MIN_STEPS, use_compile

    cfg = load_config(None, ["--model=x", "--data.train=x.jsonl"])
    assert cfg.train.compile == "auto"
    rt = runtime.local(cfg)
    monkeypatch.setattr(runtime, "bf16_supported", lambda: True)
    assert use_compile(cfg, rt, AUTO_COMPILE_MIN_STEPS)  # CPU bf16, a run long enough
    assert not use_compile(cfg, rt, AUTO_COMPILE_MIN_STEPS - 1)  # too short to pay back compiling
    cfg.train.precision = "fp32"
    assert not use_compile(cfg, rt, 1000)  # CPU fp32: the time is in matmuls
    from dataclasses import replace

    cuda = replace(rt, device=torch.device("cuda"))  # only the device type is read
    assert not use_compile(cfg, cuda, 1000)  # packed rows on CUDA: varlen attention, whose boundaries vary
    cfg.data.packing = False
    assert use_compile(cfg, cuda, 1000)
    cfg.train.compile = True
    assert use_compile(cfg, rt, 1)  # an explicit choice is kept
    assert load_config(None, ["--model=x", "--data.train=x.jsonl", "--train.compile=false"]).train.compile is False
