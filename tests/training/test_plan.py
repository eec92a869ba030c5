"""`sft plan`: the memory estimate's arithmetic on a known shape (pinned, derived by hand below),
the per-layer activation count against what autograd really keeps (saved-tensor hooks), the
parameter count against transformers' own models, the suggestion, `auto` checkpointing and the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sft.config import load_config
from sft.training import plan
from sft.training.plan import (
    CPU_SLACK_BYTES,
    RUNTIME_BYTES,
    Settings,
    Shape,
    estimate,
    layer_bytes,
    settings_of,
    shape_of,
)

_spec = importlib.util.spec_from_file_location("archs", Path(__file__).resolve().parents[2] / "bench" / "archs.py")
assert _spec is not None and _spec.loader is not None
_archs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_archs)
ARCHS = _archs.ARCHS  # the real models' shapes (bench/archs.py)

TINY = Shape(vocab=100, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=16, tied=True,
             attn_bias=False)
GiB = 2**30


def test_params_match_transformers_models_exactly():
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("Qwen2.5-0.5B", "Llama-3.2-1B", "Qwen2.5-7B"):
        hf = dict(ARCHS[name])
        config = AutoConfig.for_model(hf.pop("model_type"), **hf)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert shape_of(ARCHS[name]).params() == sum(p.numel() for p in model.parameters()), name
    assert shape_of(ARCHS["Qwen2.5-0.5B"]).params() == 494_032_768  # the published 0.49B


def test_estimate_arithmetic_full_bf16():
    # linear weights per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + 3 x 64x128 = 36864; x2 layers
    # params = 73728 + embeddings 100x64 + norms 2 layers x 2 x 64 + final norm 64 = 80448
    assert TINY.params() == 80448 and TINY.linear_params() == 73728
    st = Settings("full", "bf16", batch_size=2, max_length=32, checkpointing=False)
    # per layer and token: 2 norms x (4x64 + 4 + 2x2x64) + attention 2 x (2x64 + 2x32) + 4x4 heads
    # + MLP 4 x 2 x 128 = 1032 + 400 + 1024
    assert layer_bytes(TINY, st) == 2456
    e = estimate(TINY, st, budget=10 * GiB)
    assert (e.weights, e.gradients, e.optimizer) == (2 * 80448, 2 * 80448, 12 * 80448)
    assert e.activations == 2 * 2456 * 64 + 2 * 2 * 64 * 64  # layers + final norm / loss gradient
    # two fp32 logit chunks + the head's fp32 gradient + the bf16 d/dlogits of its matmul
    assert e.logits == 2 * 4 * 100 * 64 + 4 * 100 * 64 + 2 * 100 * 64
    assert e.step == 4 * 80448
    # max(activations + logits = 420352, gradients + step = 482688)
    assert e.runtime == RUNTIME_BYTES + CPU_SLACK_BYTES  # on a CPU; a GPU has no glibc slack
    assert e.per_process == e.runtime + 160896 + 965376 + 482688
    assert estimate(TINY, st, budget=10 * GiB, device="cuda").runtime == RUNTIME_BYTES
    assert e.fits


def test_estimate_arithmetic_lora_qlora_checkpointing():
    st = Settings("lora", "fp32", batch_size=1, max_length=64, checkpointing=False, lora_r=16)
    # adapters: 16 x (in + out) over q 128, k 96, v 96, o 128, gate/up/down 192 each = 16384 a layer
    e = estimate(TINY, st, budget=10 * GiB)
    assert e.trainable == 32768 and (e.adapters, e.gradients, e.optimizer) == (4 * 32768, 4 * 32768, 8 * 32768)
    assert e.weights == 4 * 80448
    # frozen norms 2 x (4x64 + 4); attention 4 x 192 + 16; MLP 3 x 4 x 128; adapters 8 x (6x64 + 128) + 7 x 4 x 16
    assert layer_bytes(TINY, st) == 520 + 784 + 1536 + 4544
    # NF4 linear layers (blocks of 32, uint8 scales with one fp32 scale per 256 of them), the rest fp32
    q = estimate(TINY, Settings("qlora", "fp32", 1, 64, False), budget=10 * GiB)
    assert q.weights == int((0.5 + 1 / 32 + 4 / 32 / 256) * 73728) + 4 * (80448 - 73728)
    # lora.quant_blocksize / lora.double_quant reach the estimate (controls: fp32 scales, per 32 or 64)
    assert (settings_of(load_config(None, ["--train.method=qlora"]), "fp32").quant_blocksize,
            settings_of(load_config(None, ["--train.method=qlora"]), "fp32").double_quant) == (32, True)
    cfg = load_config(None, ["--train.method=qlora", "--lora.quant_blocksize=64", "--lora.double_quant=false"])
    assert (settings_of(cfg, "fp32").quant_blocksize, settings_of(cfg, "fp32").double_quant) == (64, False)
    fp32_scales = estimate(TINY, Settings("qlora", "fp32", 1, 64, False, double_quant=False), budget=10 * GiB)
    assert fp32_scales.weights == int(0.625 * 73728) + 4 * (80448 - 73728)
    q64 = estimate(TINY, Settings("qlora", "fp32", 1, 64, False, quant_blocksize=64, double_quant=False), budget=10 * GiB)
    assert fp32_scales.weights - q64.weights == 73728 // 16
    ck = estimate(TINY, Settings("lora", "fp32", 1, 64, True), budget=10 * GiB)
    assert ck.activations == 2 * 4 * 64 * 64 + 7384 * 64 + 2 * 4 * 64 * 64  # inputs + one layer + final


def test_qlora_checkpointing_counts_the_heap_glibc_keeps():
    # QLoRA + checkpointing on a CPU: 13 bytes a layer, token and hidden unit (2 x 64 tokens x 64)
    q = estimate(TINY, Settings("qlora", "bf16", 1, 64, True), budget=10 * GiB)
    assert plan.QLORA_HEAP_BYTES == 13 and q.runtime == RUNTIME_BYTES + CPU_SLACK_BYTES + 13 * 2 * 64 * 64
    # controls: not without checkpointing, not for LoRA, not on a GPU (no glibc heap there)
    assert estimate(TINY, Settings("qlora", "bf16", 1, 64, False), budget=10 * GiB).runtime == RUNTIME_BYTES + CPU_SLACK_BYTES
    assert estimate(TINY, Settings("lora", "bf16", 1, 64, True), budget=10 * GiB).runtime == RUNTIME_BYTES + CPU_SLACK_BYTES
    assert estimate(TINY, Settings("qlora", "bf16", 1, 64, True), budget=10 * GiB, device="cuda").runtime == RUNTIME_BYTES


@pytest.mark.parametrize("method", ["full", "lora"])
def test_layer_bytes_equal_what_autograd_keeps(method):
    """The per-layer count is what a real transformers layer saves for backward (bf16, sdpa):
    the difference between a 3-layer and a 2-layer model, parameters left out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            from sft.models.load import quiet_peft

            with quiet_peft():
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                         target_modules="all-linear"))
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.get_decoder()(input_ids=torch.randint(0, 100, (1, 64)))
        return sum(seen.values())

    measured = (saved(3) - saved(2)) // 64
    st = Settings(method, "bf16", 1, 64, False)
    assert measured == layer_bytes(TINY, st)
    # control: the other method's count is not what this one keeps
    other = Settings("lora" if method == "full" else "full", "bf16", 1, 64, False)
    assert layer_bytes(TINY, other) != measured


def test_suggestion_is_the_cheapest_change_that_fits():
    s = shape_of(ARCHS["Qwen2.5-1.5B"])
    st = Settings("full", "bf16", batch_size=1, max_length=2048, checkpointing=False)
    budget = 24 * GiB
    assert not estimate(s, st, budget).fits
    text, e = plan.suggest(s, st, budget, "cpu")
    assert text == "train.method: lora" and e.fits  # checkpointing alone does not save the optimizer state
    # a run that only needs checkpointing is told exactly that
    lora = Settings("lora", "bf16", batch_size=4, max_length=2048, checkpointing=False)
    assert not estimate(s, lora, budget).fits
    assert plan.suggest(s, lora, budget, "cpu")[0] == "train.gradient_checkpointing: true"
    assert plan.suggest(s, st, 1 * GiB, "cpu") is None  # nothing fits a 1 GB machine


def test_auto_checkpointing_follows_the_plan(tiny_dir, data_file, tmp_path, monkeypatch):
    from conftest import make_cfg
    from sft.models.load import load_model
    from sft.training.prepare import prepare_model

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "run", "--train.gradient_checkpointing=auto")
    monkeypatch.setattr(plan, "device_memory", lambda: (1000 * GiB, "cpu"))
    assert not prepare_model(cfg, load_model(str(tiny_dir))).is_activation_checkpointing
    monkeypatch.setattr(plan, "device_memory", lambda: (RUNTIME_BYTES, "cpu"))  # nothing fits
    assert prepare_model(cfg, load_model(str(tiny_dir))).is_activation_checkpointing


def test_sft_plan_cli(tiny_dir, data_file, tmp_path, capsys, monkeypatch):
    from sft.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": str(tiny_dir), "data": {"train": [str(data_file)], "max_length": 256},
                               "train": {"method": "lora", "batch_size": 2, "precision": "fp32"}}))
    monkeypatch.setattr(plan, "device_memory", lambda: (24 * GiB, "cpu"))
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "method lora | fp32 | 1 process | micro-batch 2 x 256 tokens | checkpointing off" in out
    assert "fits" in out and "does NOT" not in out
    assert main(["plan", str(cfg), "--json", "--nproc", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["processes"] == 2 and data["shape"]["hidden"] == 32
    monkeypatch.setattr(plan, "device_memory", lambda: (RUNTIME_BYTES, "cpu"))
    assert main(["plan", str(cfg)]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_offload_stops_where_fsdp2_cannot_offload(tiny_dir, data_file, tmp_path):
    from conftest import make_cfg
    from sft.errors import SftError
    from sft.training.distributed import check_offload

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "run", "--train.offload=true")
    with pytest.raises(SftError, match="this run is on the CPU"):
        check_offload(cfg, "one process", "cpu")
    with pytest.raises(SftError, match=r"needs train\.parallel: fsdp under torchrun"):
        check_offload(cfg, "ddp", "cuda")
    check_offload(cfg, "fsdp", "cuda")  # the supported case passes
    check_offload(make_cfg(tiny_dir, data_file, tmp_path / "run"), "one process", "cpu")  # control: no offload asked


def test_plan_constants_are_the_losss():
    from sft.lm import loss

    assert (plan.CHUNK_BYTES, plan.GRAD_GROUP_BYTES) == (loss.CHUNK_BYTES, loss.GRAD_GROUP_BYTES)
