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


def test_master_state_keyed_by_parameter_names_loads():
    """torch.distributed.checkpoint (an FSDP2 resume) hands the state keyed by parameter names, not
    ids; the masters still come back in fp32, each on its own parameter (a resume stopped with
    "invalid literal for int()")."""
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}
    a, b = (torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(i)).bfloat16()) for i in (1, 2))
    opt = MasterAdamW([a, b], **kw)
    a.grad, b.grad = torch.ones(4, 3, dtype=torch.bfloat16), -torch.ones(4, 3, dtype=torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    names = {0: "layer.a", 1: "layer.b"}
    by_name = {"state": {names[k]: v for k, v in sd["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    a2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    new = MasterAdamW([a2, b2], **kw)
    new.load_state_dict(by_name)
    for old_p, new_p in ((a, a2), (b, b2)):
        assert new.state[new_p]["master"].dtype == torch.float32
        assert torch.equal(new.state[new_p]["master"], opt.state[old_p]["master"])
        assert torch.equal(new.state[new_p]["exp_avg"], opt.state[old_p]["exp_avg"])


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


def test_stochastic_rounding_is_unbiased_where_nearest_is_not():
    """1 + 2**-10 lies 1/8 of a bf16 step above 1: rounding to nearest always gives 1 (the control),
    stochastic rounding gives 1 + 2**-7 about one time in eight, so the mean is the fp32 value."""
    from sft.lm.rounding import stochastic_round_

    x = torch.full((1 << 20,), 1.0 + 2**-10)
    near = x.bfloat16()
    sr = stochastic_round_(torch.empty_like(x, dtype=torch.bfloat16), x, torch.Generator().manual_seed(0))
    assert set(sr.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert float(near.float().mean()) == 1.0
    # the mean of 2**18 independent draws (one block of random bits, reused) has sd 2**-7 * sqrt(7/64) / 2**9 = 5e-6
    assert abs(float(sr.double().mean()) - (1.0 + 2**-10)) < 1.5e-5
    neg = stochastic_round_(torch.empty_like(x, dtype=torch.bfloat16), -x, torch.Generator().manual_seed(0))
    assert torch.equal(neg, -sr)  # symmetric: the magnitude is what rounds
    y = torch.randn(1000).bfloat16().float()  # already bf16: unchanged
    assert torch.equal(stochastic_round_(torch.empty_like(y, dtype=torch.bfloat16), y, torch.Generator()), y.bfloat16())
    with pytest.raises(ValueError, match="fp32 source and a bf16 destination"):
        stochastic_round_(torch.empty(3), torch.ones(3), torch.Generator())


def test_stochastic_master_adamw_moves_bf16_weights_below_half_a_step():
    """lr 1e-5 for 100 steps moves each master by ~1e-3, a quarter of the half bf16 step (2**-8)
    at 1: with nearest rounding (the control) no bf16 weight moves; with stochastic rounding the
    bf16 weights follow their masters on average."""
    start = torch.ones(4096, dtype=torch.bfloat16)
    moved = {}
    for rounding in ("nearest", "stochastic"):
        w = torch.nn.Parameter(start.clone())
        opt = MasterAdamW([w], lr=1e-5, betas=(0.9, 0.999), eps=1e-8, rounding=rounding, seed=3)
        for _ in range(100):
            w.grad = torch.ones_like(w)
            opt.step()
        master = opt.state[w]["master"]
        assert abs(float(1 - master.mean()) - 1e-3) < 1e-5  # the masters moved the same in both
        moved[rounding] = float(1 - w.detach().double().mean())
    assert moved["nearest"] == 0.0
    assert abs(moved["stochastic"] - 1e-3) < 2e-4


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_resume_draws_the_same_rounding(rounding):
    """The random bits of a step come from (seed, step): a run resumed from a checkpoint's state
    rounds exactly as the uninterrupted one (control: another seed rounds differently)."""
    grads = bf16_grads((64, 32), 8)

    def run(resume_at, seed=1):
        w = torch.nn.Parameter(torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).bfloat16())
        kw = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "rounding": rounding, "seed": seed}
        opt = MasterAdamW([w], **kw)
        for i, g in enumerate(grads):
            if i == resume_at:
                sd = opt.state_dict()
                w = torch.nn.Parameter(w.detach().clone())
                opt = MasterAdamW([w], **kw)
                opt.load_state_dict(sd)
            w.grad = g.bfloat16()
            opt.step()
        return w.detach()

    straight = run(None)
    assert torch.equal(run(4), straight)
    assert torch.equal(run(None, seed=2), straight) == (rounding == "nearest")


def test_saving_in_bf16_rounds_stochastically_and_fp32_saves_the_masters():
    """``cast_for_saving``: an fp32 weight 1/8 of a bf16 step above 1 keeps that eighth on average
    in bf16 (nearest, the control, drops it); a bf16 run saved in fp32 writes its fp32 masters, not
    its bf16 copies."""
    from sft.models.save import cast_for_saving

    def model(value, dtype):
        m = torch.nn.Linear(512, 512, bias=False)
        torch.nn.init.constant_(m.weight, value)
        return m.to(dtype)

    cfg = load_config(None, ["--model=x", "--data.train=x.jsonl"])
    assert cfg.train.bf16_rounding == "stochastic"
    sr = cast_for_saving(model(1 + 2**-10, torch.float32), torch.bfloat16, cfg).weight.detach()
    assert sr.dtype == torch.bfloat16 and abs(float(sr.double().mean()) - (1 + 2**-10)) < 2e-5
    cfg.train.bf16_rounding = "nearest"
    assert float(cast_for_saving(model(1 + 2**-10, torch.float32), torch.bfloat16, cfg).weight.detach().double().mean()) == 1.0
    masters = {"weight": torch.full((512, 512), 1 + 2**-10)}
    saved = cast_for_saving(model(1.0, torch.bfloat16), torch.float32, cfg, masters).weight.detach()
    assert saved.dtype == torch.float32 and torch.equal(saved, masters["weight"])
    assert torch.equal(cast_for_saving(model(1.0, torch.bfloat16), torch.float32, cfg).weight.detach(), torch.ones(512, 512))
