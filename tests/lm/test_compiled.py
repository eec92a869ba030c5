"""Regional compilation with static shapes (sft.lm.compiled): nothing recompiles after the first
step, results equal the eager run's, and a failing compiler falls back to eager with a warning.

What these tests prove and what they do not: they run dynamo with a counting backend
(``CompileCounter``: dynamo traces and guards exactly as it would for inductor, then runs the
captured graph eagerly) or ``aot_eager`` (AOTAutograd's joint forward/backward graph, no code
generation), so they pin the *number of graphs dynamo captures* and that the traced, padded step
computes the eager step's losses. They do not run inductor's generated code (slow to compile on
this machine); `sft bench` with ``train.compile: true`` does (bench/RESULTS.md).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import make_cfg
from sft.lm.compiled import compile_regions, decoder_layers, is_compiled
from sft.runtime import local
from sft.training import step as step_mod
from sft.training.optim import lr_at
from sft.training.prepare import prepare
from sft.training.step import train_step

STEPS = 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled code of other tests shares the code objects (and their cache limit)
    yield
    torch._dynamo.reset()


def run(tiny_dir, data_file, out, backend=None, steps=STEPS, after_step=None, extra=()):
    """``steps`` optimizer steps of the tiny run (batch 2, max_length 128), compiled with ``backend``
    (None: eager); ``after_step(k)`` runs after each step. Returns the losses."""
    cfg = make_cfg(tiny_dir, data_file, out, "--train.batch_size=2", "--train.compile=false", *extra)
    rt = local(cfg)
    p = prepare(cfg, rt, steps)
    if backend is not None:
        compile_regions(p.model, backend=backend)
    losses = []
    for k in range(steps):
        losses.append(train_step(p.model, p.optimizer, p.plan[k], p.data.examples, cfg, p.pad_id, rt,
                                 lr_at(k, steps, cfg.train)).loss)
        if after_step:
            after_step(k)
    return losses


def test_no_recompile_after_the_first_step(tiny_dir, data_file, tmp_path):
    counter = CompileCounter()
    frames = []
    run(tiny_dir, data_file, tmp_path / "r", counter, after_step=lambda k: frames.append(counter.frame_count))
    # step 1 captures 2 graphs: one decoder block (the tiny Llama's 2 layers share it) and the loss chunk
    assert frames == [2, 2, 2, 2]


def test_control_variable_shapes_recompile(tiny_dir, data_file, tmp_path, monkeypatch):
    """The counter catches recompiles: batches as wide as their longest row (the old collate)
    give the block new shapes, and dynamo (dynamic=False) captures it again."""
    counter = CompileCounter()
    frames = []
    monkeypatch.setattr(step_mod, "static_shape", lambda cfg: None)
    run(tiny_dir, data_file, tmp_path / "r", counter, after_step=lambda k: frames.append(counter.frame_count))
    assert frames[0] >= 2 and frames[-1] > frames[0]


@pytest.mark.parametrize("extra", [(), ("--train.method=lora", "--lora.dropout=0", "--train.lr=1e-2")],
                         ids=["full", "lora"])
def test_compiled_static_steps_equal_eager_steps(tiny_dir, data_file, tmp_path, extra):
    """Also for LoRA (PEFT's wrapped linears inside the compiled blocks): the adapters' updates
    reach the compiled graph (lr 1e-2: the losses move)."""
    eager = run(tiny_dir, data_file, tmp_path / "e", extra=extra)
    compiled = run(tiny_dir, data_file, tmp_path / "c", "aot_eager", extra=extra)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=1e-6)
    assert len(set(eager)) == STEPS  # the weights move: four different losses


def test_failing_compiler_falls_back_to_eager_with_a_warning(tiny_dir, data_file, tmp_path):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    eager = run(tiny_dir, data_file, tmp_path / "e")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = run(tiny_dir, data_file, tmp_path / "c", broken)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "train.compile" in messages[0] and "no C++ compiler here" in messages[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-5, atol=1e-6)


def test_compile_regions_compiles_each_layer_and_keeps_names(tiny_llama_model):
    before = [n for n, _ in tiny_llama_model.named_parameters()]
    compile_regions(tiny_llama_model, backend="eager")
    assert is_compiled(tiny_llama_model)
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(tiny_llama_model))
    assert [n for n, _ in tiny_llama_model.named_parameters()] == before  # checkpoints keep their keys
