"""``train.method: qlora`` on the tiny Llama: the base's linear layers are 4-bit NF4 (bitsandbytes),
the loss goes down, a paused run resumes exactly, ``final/`` (dequantized base + adapters) loads in
plain transformers and computes what the trained model computes, and `sft export` writes that model.
Controls: merging the adapters into the original (unquantized) weights gives another model; a
resume without the optimizer state gives other losses."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import make_cfg

pytest.importorskip("bitsandbytes")  # the qlora extra (make install installs it)

from sft.errors import SftError
from sft.models import quantize
from sft.training.loop import train

EXTRA = ["--train.method=qlora", "--train.batch_size=2", "--train.max_steps=6", "--data.packing=false",
         "--data.template=chatml"]


def _adapted_base(tiny_dir, run, quantized: bool):
    """The base (NF4 as trained, or the original fp32 weights) with the run's adapter/ applied."""
    from peft import PeftModel

    from sft.models.load import load_model, quiet_peft

    cfg = make_cfg(tiny_dir, run / "x", run / "x", *EXTRA)
    nf4 = quantize.bnb_config(cfg, torch.float32) if quantized else None
    with quiet_peft():
        return PeftModel.from_pretrained(load_model(str(tiny_dir), torch.float32, quantization=nf4),
                                         str(run / "adapter")).eval()


def test_qlora_trains_resumes_exactly_and_final_is_the_trained_model(tiny_dir, data_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import sft.training.checkpoint as ck
    from sft.runtime import local
    from sft.training.prepare import prepare

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "ref", *EXTRA)
    model = prepare(cfg, local(cfg), 6).model
    held, bf16 = quantize.quantized_bytes(model)
    # 4 bits a weight, a uint8 scale per 32 weights, and per tensor (7 a layer) one fp32 scale of
    # those scales (<= 256 of them here) and one fp32 offset; 2 bytes a weight for bf16
    assert bf16 == 2 * 2 * (32 * 32 + 32 * 16 * 2 + 32 * 32 + 3 * 32 * 64)  # 2 bytes x 2 layers x 9216
    assert held == 2 * (9216 // 2 + 9216 // 32 + 7 * (4 + 4))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}

    ref = train(cfg, progress=False).losses
    assert ref == pytest.approx([10.855516, 10.851846, 10.798705, 10.749537, 10.736144, 10.761073], rel=1e-5)
    assert max(ref[3:]) < ref[0] - 0.09  # learning (each step sees other rows, so not monotone)

    first = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *EXTRA), progress=False,
                  stop_check=lambda step, loss: "pause" if step == 3 else None)
    assert first.losses == ref[:3]
    shutil.copytree(tmp_path / "run", tmp_path / "run2")
    rest = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *EXTRA), resume=True, progress=False)
    assert rest.losses == ref[3:]  # exact: the base requantizes to the same codes

    # final/: plain transformers, no quantization left, the logits of the trained (NF4 + adapter) model
    final = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ref" / "final")).eval()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ref" / "final" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == set(final.state_dict()) - {"lm_head.weight"}  # no base_layer/lora_ leftovers (tied head)
    assert "quantization_config" not in final.config.to_dict()
    assert all(type(m).__name__ != "Linear4bit" for m in final.modules())
    ids = torch.tensor([[1, 400, 2000, 17, 9000, 33, 4]])
    with torch.no_grad():
        want = _adapted_base(tiny_dir, tmp_path / "ref", quantized=True)(input_ids=ids).logits
        got = final(input_ids=ids).logits
        other = _adapted_base(tiny_dir, tmp_path / "ref", quantized=False).merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # control: the adapters merged into the original weights are another model (NF4's rounding)
    assert (other - want).abs().max() > 100 * (got - want).abs().max()

    # control: a resume without the optimizer state does not reproduce the losses
    monkeypatch.setattr(ck, "_load_optimizer", lambda *a, **k: None)
    control = train(make_cfg(tiny_dir, data_file, tmp_path / "run2", *EXTRA), resume=True, progress=False)
    assert control.losses[0] == ref[3] and control.losses[1:] != ref[4:]

    # sft export --to hf writes final/'s model (not the adapters merged into the unquantized base)
    from sft.export.run import export

    export(str(tmp_path / "ref"), "hf", out=str(tmp_path / "hf"))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, got)


def test_qlora_stops_where_it_cannot_run(tiny_dir, data_file, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_dir, data_file, tmp_path / "run", *EXTRA)
    with pytest.raises(SftError, match=r"qlora runs in one process; this run has 2\. DDP and FSDP2"):
        quantize.check(cfg, world=2)
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SftError, match="needs the bitsandbytes package"):
        quantize.check(cfg, world=1)
    quantize.check(make_cfg(tiny_dir, data_file, tmp_path / "run"), world=2)  # control: not qlora, no error


def test_adamw_8bit_keeps_uint8_moments_and_resumes_exactly(tiny_dir, data_file, tmp_path):
    """``train.optimizer: adamw_8bit`` (bitsandbytes): the embedding's moments are uint8 (tensors
    under 4096 elements keep fp32 ones), the run resumes exactly, and the losses differ from torch's
    AdamW (control: the key is not ignored)."""
    from sft.runtime import local
    from sft.training.prepare import prepare

    extra = ["--train.batch_size=2", "--train.max_steps=4", "--data.packing=false", "--data.template=chatml"]
    cfg = make_cfg(tiny_dir, data_file, tmp_path / "ref", *extra, "--train.optimizer=adamw_8bit")
    p = prepare(cfg, local(cfg), 4)
    assert type(p.optimizer).__name__ == "AdamW8bit"
    ref = train(cfg, progress=False).losses
    first = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *extra, "--train.optimizer=adamw_8bit"),
                  progress=False, stop_check=lambda step, loss: "pause" if step == 2 else None)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "optimizer.safetensors"))
    assert {v.dtype for k, v in saved.items() if k.endswith(".state1")} == {torch.uint8, torch.float32}
    assert first.losses == ref[:2]
    rest = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *extra, "--train.optimizer=adamw_8bit"),
                 resume=True, progress=False)
    assert rest.losses == ref[2:]
    torch_adamw = train(make_cfg(tiny_dir, data_file, tmp_path / "plain", *extra), progress=False).losses
    assert torch_adamw[0] == ref[0] and torch_adamw[1:] != ref[1:]


def _reconstruction(tiny_dir, cfg):
    """Per adapted layer: ||W - Q - scaling B A|| / ||W - Q|| (W: the saved fp32 weight, Q: its NF4
    dequantized) for the model as prepare_model leaves it, and the same ratio that Eckart-Young
    gives for the best rank-r approximation of W - Q."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from sft.models.load import load_model
    from sft.training.prepare import prepare_model

    original = load_file(str(tiny_dir / "model.safetensors"))
    model = prepare_model(cfg, load_model(str(tiny_dir), torch.float32, quantization=quantize.bnb_config(cfg, torch.float32)))
    got, best = {}, {}
    for name, m in model.get_base_model().named_modules():
        if isinstance(m, LoraLayer):
            err = original[name + ".weight"] - quantize._dequantized(m.get_base_layer())
            got[name] = float((err - m.get_delta_weight("default").detach()).norm() / err.norm())
            s = torch.linalg.svdvals(err)
            best[name] = float((s[cfg.lora.r:].square().sum() / s.square().sum()).sqrt())
    return got, best


def test_loftq_starts_the_adapters_at_the_rank_r_part_of_what_nf4_lost(tiny_dir, data_file, tmp_path):
    """``lora.init: loftq``: scaling * B A is the rank-r SVD of W - NF4(W), so each adapted layer's
    error is exactly the best a rank-r adapter can do (Eckart-Young). Control: the default
    initialisation (B = 0) leaves NF4's whole error; an update not divided by scaling (alpha / r = 2,
    as PEFT's replace_lora_weights_loftq sets it) would leave at least as much."""
    got, best = _reconstruction(tiny_dir, make_cfg(tiny_dir, data_file, tmp_path / "x", *EXTRA, "--lora.r=4", "--lora.init=loftq"))
    assert len(got) == 14  # 7 linear layers x 2 decoder layers
    assert got == pytest.approx(best, abs=1e-5)
    mean = sum(got.values()) / len(got)
    assert mean == pytest.approx(0.774568, abs=1e-5)  # NF4's error (its norm) down to 0.77 of itself, on average
    assert max(got.values()) == pytest.approx(0.842779, abs=1e-5)  # q_proj/o_proj-sized layers keep most
    default, _ = _reconstruction(tiny_dir, make_cfg(tiny_dir, data_file, tmp_path / "x", *EXTRA, "--lora.r=4"))
    assert set(default.values()) == {1.0}


def test_loftq_trains_and_resumes_exactly(tiny_dir, data_file, tmp_path):
    """A LoftQ run pauses and resumes to the same losses (its base is plain NF4, its adapters come
    from the checkpoint), and its first loss (before any update) is not the default initialisation's
    (control: the key is not ignored). That it starts nearer the unquantized model is the previous
    test's: on this random model (loss ~ ln(vocab)) NF4 in blocks of 32 moves the first loss by
    7e-5 only, less than the adapters' dropout does."""
    extra = [*EXTRA, "--lora.r=4", "--train.max_steps=4"]
    ref = train(make_cfg(tiny_dir, data_file, tmp_path / "ref", *extra, "--lora.init=loftq"), progress=False).losses
    assert ref == pytest.approx([10.856281, 10.868041, 10.812983, 10.793076], rel=1e-6)
    first = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *extra, "--lora.init=loftq"), progress=False,
                  stop_check=lambda step, loss: "pause" if step == 2 else None)
    rest = train(make_cfg(tiny_dir, data_file, tmp_path / "run", *extra, "--lora.init=loftq"), resume=True, progress=False)
    assert first.losses + rest.losses == ref
    one = ["--train.max_steps=1"]
    default = train(make_cfg(tiny_dir, data_file, tmp_path / "default", *extra, *one), progress=False).losses[0]
    lora = train(make_cfg(tiny_dir, data_file, tmp_path / "lora", *extra, *one, "--train.method=lora"), progress=False).losses[0]
    assert (default, lora) == pytest.approx((10.855516, 10.855445), rel=1e-6)
    assert abs(ref[0] - default) > 5e-4  # the adapters start elsewhere (and dropout now acts on them)


def test_loftq_needs_qlora(tiny_dir, data_file, tmp_path):
    with pytest.raises(SftError, match=r"lora.init: loftq starts the adapters from a 4-bit base's quantization error; "
                                       r"train.method: lora has none"):
        make_cfg(tiny_dir, data_file, tmp_path / "x", "--train.method=lora", "--lora.init=loftq")
    make_cfg(tiny_dir, data_file, tmp_path / "x", "--train.method=qlora", "--lora.init=loftq")  # control


def test_quant_blocksize_reaches_every_layer_and_shrinks_the_error(tiny_dir, data_file, tmp_path):
    """``lora.quant_blocksize`` (default 32): transformers' loader quantizes every linear weight in
    blocks of 32 (bitsandbytes' own default is 64), which loses less than blocks of 64 (control:
    the same weights quantized by bitsandbytes at its default); without ``lora.double_quant`` a
    weight takes 0.625 bytes (4 bits and an fp32 scale per 32)."""
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from sft.models.load import load_model

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "x", *EXTRA)
    assert (cfg.lora.quant_blocksize, cfg.lora.double_quant) == (32, True)
    model = load_model(str(tiny_dir), torch.float32, quantization=quantize.bnb_config(cfg, torch.float32))
    layers = {n: m for n, m in model.named_modules() if quantize._is_4bit(m)}
    assert len(layers) == 14 and {m.weight.quant_state.blocksize for m in layers.values()} == {32}
    assert {m.weight.quant_state.nested for m in layers.values()} == {True}
    plain = make_cfg(tiny_dir, data_file, tmp_path / "x", *EXTRA, "--lora.double_quant=false")
    held, bf16 = quantize.quantized_bytes(load_model(str(tiny_dir), torch.float32,
                                                     quantization=quantize.bnb_config(plain, torch.float32)))
    assert held / bf16 == 0.625 / 2  # 4 bits + one fp32 scale per 32 weights
    original = load_file(str(tiny_dir / "model.safetensors"))
    err32 = err64 = norm = 0.0
    for name, m in layers.items():
        w = original[name + ".weight"]
        err32 += float((quantize._dequantized(m) - w).square().sum())
        codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        err64 += float((_flat_dequantized(codes, state) - w).square().sum())  # as quantized (see below)
        norm += float(w.square().sum())
    assert (err32 / norm) ** 0.5 == pytest.approx(0.087889, abs=1e-5)
    assert (err64 / norm) ** 0.5 == pytest.approx(0.091936, abs=1e-5)  # control: blocks of 64 lose more


def _flat_dequantized(codes, state):
    """NF4 dequantized as ``quantize_4bit`` makes the blocks, of the flattened weight (as bitsandbytes'
    pure-torch kernel does; its CPU kernel instead blocks each row: see the next test)."""
    b = codes.view(torch.uint8).reshape(-1)
    idx = torch.stack([b >> 4, b & 0xF], 1).reshape(-1).long()  # two codes a byte, high nibble first
    values = state.code[idx].view(-1, state.blocksize) * state.absmax.view(-1, 1)
    return values.reshape(state.shape)


def test_quant_blocksize_that_does_not_divide_a_row_stops(tiny_dir, data_file, tmp_path):
    """A block size that does not divide a layer's input features stops the load: bitsandbytes'
    CPU kernel would compute with other weights than it quantized (shown on a (16, 32) weight:
    blocks of 64 come back with over twice the error of blocks of 32). A block size bitsandbytes does not
    have is a config error."""
    import bitsandbytes.functional as bnbf

    from sft.models.load import load_model

    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    rel = {}
    for bs in (32, 64):
        codes, state = bnbf.quantize_4bit(w, blocksize=bs, quant_type="nf4")
        rel[bs] = float((bnbf.dequantize_4bit(codes, state) - w).norm() / w.norm())
        assert torch.equal(_flat_dequantized(codes, state), bnbf.dequantize_4bit(codes, state)) == (bs == 32)
    assert rel[32] == pytest.approx(0.083570, abs=1e-5)
    assert not rel[64] < 2 * rel[32]  # the kernel reads 16 row blocks where 8 exist: not a stable value

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "x", *EXTRA, "--lora.quant_blocksize=64")
    with pytest.raises(SftError, match=r"lora.quant_blocksize: 64 does not divide the input features of "
                                       r"model.layers.0.self_attn.q_proj \(32\) and 11 other layers; "):
        load_model(str(tiny_dir), torch.float32, quantization=quantize.bnb_config(cfg, torch.float32))
    with pytest.raises(SftError, match=r"lora.quant_blocksize: 48 is not a block size bitsandbytes' NF4 supports; "
                                       r"use one of 32, 64, 128, 256, 512, 1024, 2048, 4096 \(default 32\)"):
        make_cfg(tiny_dir, data_file, tmp_path / "x", *EXTRA, "--lora.quant_blocksize=48")
