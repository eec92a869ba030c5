"""Regional compilation: each decoder block and the loss's chunk, compiled once for static shapes.

``compile_regions`` compiles every decoder layer (``layer.compile(dynamic=False)``: layers of one
class share their graph, so a 30-layer model compiles one block, not 30, plus a second graph
where layers differ, e.g. Gemma 3's sliding and global layers) and the loss's ``ce_chunk``
separately. The embedding, rotary tables, mask and final norm stay eager: they are cheap and
their inputs change in ways a graph would guard on.

Shapes never change from step to step (``static_shape``): micro-batches are always
``[batch_size, max_length]`` (``sft.data.collate``) and the head/cross-entropy runs on chunks of
a fixed number of positions (``sft.lm.loss.static_chunks``), so after the first step nothing
recompiles (tests/lm/test_compiled.py counts it).

Compiled code runs only where gradients are on (training steps): held-out loss and generation
(``no_grad``, variable shapes) run the same modules eagerly instead of compiling a graph per shape.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from sft.lm.loss import COMPILED_CE, ce_chunk, unwrap


def causal_lm(model: Any) -> Any:
    """The ``*ForCausalLM`` inside DDP, ``LossModule``, PEFT or ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "lm", model)  # LossModule
    return unwrap(model)


def decoder_layers(lm: Any) -> list[torch.nn.Module]:
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(lm).__name__} has no model.layers to compile one by one")
    return list(layers)


def _only_with_grad(layer: torch.nn.Module, compiled: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return layer._call_impl(*args, **kwargs)  # no_grad: eager (evaluation shapes vary)

    return call


def compile_regions(model: Any, backend: Any = "inductor") -> None:
    """Compile each decoder layer and the loss chunk of ``model`` in place (names and state dicts
    stay the same). Compilation itself happens at the first training step."""
    lm = causal_lm(model)
    for layer in decoder_layers(lm):
        compiled = torch.compile(layer._call_impl, backend=backend, dynamic=False)
        layer._compiled_call_impl = _only_with_grad(layer, compiled)  # what Module.compile() sets
    setattr(lm, COMPILED_CE, torch.compile(ce_chunk, backend=backend, dynamic=False))


def is_compiled(model: Any) -> bool:
    return hasattr(causal_lm(model), COMPILED_CE)


def decompile(model: Any) -> None:
    """Undo ``compile_regions``: every module runs eagerly again."""
    lm = causal_lm(model)
    for layer in decoder_layers(lm):
        layer._compiled_call_impl = None
    if hasattr(lm, COMPILED_CE):
        delattr(lm, COMPILED_CE)


def compile_failed(model: Any, error: BaseException) -> None:
    """The fallback when compiling fails: warn, naming the error, and go on eagerly."""
    cause: BaseException = error
    while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None:
        cause = inner  # dynamo wraps the backend's own error
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    named = type(error).__name__ + (f" from {type(cause).__name__}" if cause is not error else "")
    warnings.warn(
        f"train.compile: compiling the model failed ({named}: {first}); training goes on "
        "without compile (same results, slower). Set train.compile: false to skip the attempt.",
        RuntimeWarning, stacklevel=2,
    )
    decompile(model)


def compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "compilation failed", not "the model is wrong": dynamo's and inductor's."""
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)
