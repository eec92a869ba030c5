"""``train.method: qlora``: LoRA adapters on a base whose linear layers are 4-bit NF4.

The quantization is bitsandbytes' (``Linear4bit``, NF4, optional double quantization), loaded
through transformers' ``BitsAndBytesConfig`` and adapted with PEFT exactly as LoRA is; its recent
releases (>= 0.46) run NF4 on a CPU as well as on CUDA. Nothing is quantized here by hand.

- The decoder's linear layers hold 4-bit codes plus a scale per ``lora.quant_blocksize`` weights:
  32 by default, where bitsandbytes' default is 64: the finer block loses less (relative error
  0.0879 against 0.0919 on the test model's weights, tests/training/test_qlora.py) and brought
  QLoRA's held-out loss to LoRA's on SmolLM2-135M (bench/RESULTS.md); transformers' config has no
  key for it, so ``applying`` sets it on the layers transformers builds. With
  ``lora.double_quant`` (default true) the scales are 8-bit with an fp32 scale per 256 of them:
  0.53 bytes a weight, ~0.27 of bf16 (fp32 scales: 0.625 per block of 32, 0.5625 per 64).
  Embeddings, norms and the output head stay in the training dtype.
- Only the adapters train (fp32, as LoRA's); checkpoints hold them and the optimizer, and a
  resume requantizes the same base weights into the same codes, so it continues exactly.
- ``final/`` is ``merged``: each NF4 weight dequantized plus its adapter's update, in one plain
  ``nn.Linear``: the function the run trained, as a model plain transformers loads. Merging into
  the original (unquantized) weights instead would give another model than the one trained.
- ``lora.init: loftq`` starts each adapter at the best rank-r approximation of what NF4 lost
  (``loftq``), so training begins near the unquantized model instead of the NF4 one.
- One process only: DDP and FSDP2 of bitsandbytes' packed 4-bit parameters are not supported
  here, and a run under torchrun stops with an error instead of falling back.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sft.config import Config
from sft.errors import SftError

INSTALL = "pip install 'bitsandbytes>=0.46' (or `pip install -e '.[qlora]'`)"


@contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Around the first import of bitsandbytes (peft imports it when installed): its import uses
    ``torch.jit.script_method``, which torch 2.13 deprecates with one warning per use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        yield


def check(cfg: Config, world: int) -> None:
    """Stop before loading anything when QLoRA cannot run: no bitsandbytes, several processes."""
    if cfg.train.method != "qlora":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SftError(f"train.method: qlora needs the bitsandbytes package; install it with {INSTALL}, "
                       "or use train.method: lora")
    if world > 1:
        raise SftError(f"train.method: qlora runs in one process; this run has {world}. DDP and FSDP2 of "
                       "bitsandbytes' 4-bit weights are not supported here: run without --nproc/torchrun, or use "
                       "train.method: lora (which runs under DDP and FSDP2)")


@dataclass(frozen=True)
class NF4:
    """How QLoRA's base is quantized (``sft.models.load.load_model(quantization=...)``): bitsandbytes
    NF4, one absmax scale per ``blocksize`` consecutive weights of a row, compute in ``compute_dtype``."""

    compute_dtype: torch.dtype
    double_quant: bool = True
    blocksize: int = 32

    def transformers_config(self) -> Any:
        """transformers' ``BitsAndBytesConfig`` (it has no block-size key: see ``applying``)."""
        from transformers import BitsAndBytesConfig

        with quiet_bitsandbytes():
            import bitsandbytes  # noqa: F401  (imported here, quietly, before transformers does)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=self.compute_dtype,
                                  bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_quant_storage=torch.uint8)


def bnb_config(cfg: Config, dtype: torch.dtype) -> NF4:
    """QLoRA's quantization for ``cfg`` (``lora.double_quant``, ``lora.quant_blocksize``), computing in
    ``dtype`` (the training dtype)."""
    return NF4(dtype, cfg.lora.double_quant, cfg.lora.quant_blocksize)


@contextmanager
def applying(nf4: NF4) -> Iterator[None]:
    """Around transformers' 4-bit ``from_pretrained``: quantize with ``nf4.blocksize``.

    transformers (5.x) swaps each linear layer for a ``Linear4bit`` on the meta device (its
    ``_process_model_before_weight_loading``), then quantizes each loaded weight as
    ``Params4bit(value, **meta_weight.__dict__)``: the block size set on those meta weights in
    between is the one each weight is quantized with, tensor by tensor as it loads (no bf16 copy of
    the model). ``checked`` then verifies every layer got it, so a transformers that builds its
    weights another way stops the run instead of silently using bitsandbytes' default of 64.
    """
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    original = Bnb4BitHfQuantizer._process_model_before_weight_loading

    def with_blocksize(self: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, model, *args, **kwargs)
        for m in model.modules():
            if _is_4bit(m):
                m.weight.blocksize = nf4.blocksize
        return result

    Bnb4BitHfQuantizer._process_model_before_weight_loading = with_blocksize  # type: ignore[method-assign]
    try:
        yield
    finally:
        Bnb4BitHfQuantizer._process_model_before_weight_loading = original  # type: ignore[method-assign]


def checked(model: Any, nf4: NF4) -> Any:
    """``model`` as loaded with ``nf4``: every 4-bit layer quantized with ``nf4.blocksize``, and each
    row a whole number of blocks. Why the second: bitsandbytes (0.50) quantizes a weight in blocks
    of its flattened elements, but its CPU kernel dequantizes block by block within each row, so
    where ``in_features`` is not a multiple of the block size the CPU computes with other weights
    than those quantized (a relative error of 0.2-0.6 instead of 0.09; CUDA's kernel agrees with
    the quantizer)."""
    wrong, ragged = [], []
    for name, m in model.named_modules():
        if not _is_4bit(m):
            continue
        if m.weight.quant_state is None or m.weight.quant_state.blocksize != nf4.blocksize:
            wrong.append(name)
        elif m.in_features % nf4.blocksize and m.in_features % 2 == 0:  # odd rows take bnb's generic (right) path
            ragged.append(f"{name} ({m.in_features})")
    if wrong:
        raise SftError(f"lora.quant_blocksize: {nf4.blocksize} was not applied to {len(wrong)} 4-bit layers "
                       f"({wrong[0]}, ...) by this transformers version's loader; use lora.quant_blocksize: 64 "
                       "(bitsandbytes' default, which needs no help from sft)")
    if ragged:
        raise SftError(f"lora.quant_blocksize: {nf4.blocksize} does not divide the input features of {ragged[0]}"
                       f"{' and ' + str(len(ragged) - 1) + ' other layers' if len(ragged) > 1 else ''}; bitsandbytes' "
                       "CPU kernel would dequantize other weights than it quantized. Use lora.quant_blocksize: 32 (or "
                       "another size that divides every linear layer's input features)")
    return keep_training_layout(model)


def keep_training_layout(model: Any) -> Any:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (on avx512_bf16 CPUs, the
    first forward in eval mode without gradients repacks each weight in place): it rounds the
    fp32 scales to bf16, so a run that evaluates mid-training would then train on other weights,
    and the repacked layout has no backward pass. The training layout serves both."""
    for m in model.modules():
        if _is_4bit(m):
            m.support_avx512bf16_for_cpu = False
    return model


def _is_4bit(module: Any) -> bool:
    """A bitsandbytes ``Linear4bit`` (not PEFT's LoRA wrapper of one, which shares its name)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def is_quantized(model: Any) -> bool:
    """``model`` has bitsandbytes 4-bit layers."""
    return any(_is_4bit(m) for m in model.modules())


def quantized_bytes(model: Any) -> tuple[int, int]:
    """(bytes the 4-bit linear weights take, with their scales; bytes they would take in bf16)."""
    held = bf16 = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        state = getattr(w, "quant_state", None)
        if not _is_4bit(m) or state is None or w is None:
            continue
        held += w.numel() * w.element_size() + state.absmax.numel() * state.absmax.element_size()
        if state.state2 is not None:  # double quantization: the scales' own scales
            held += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.numel() * 4
        bf16 += 2 * int(torch.Size(state.shape).numel())
    return held, bf16


def _dequantized(layer: Any) -> torch.Tensor:
    """The fp32 weight an NF4 (or plain) linear layer computes with."""
    w = layer.weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w.detach().float()  # type: ignore[no-any-return]
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.data, state).float()


def _tensor_files(path: Path) -> dict[str, Path]:
    """Which safetensors file of the HF directory ``path`` holds each tensor (keys only, no weights)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    return where


@torch.no_grad()
def loftq(model: Any, weights_dir: Path) -> int:
    """LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-fine-tuning-aware quantization", one
    alternation) of a QLoRA ``PeftModel``'s adapters; ``weights_dir``: the HF directory the model
    was loaded from, whose unquantized weights are read one layer at a time. Returns the number of
    layers initialised.

    For each adapted 4-bit layer, with ``W`` the weight NF4 quantized (in the compute dtype, as it
    was loaded) and ``Q`` its dequantized NF4 codes: ``scaling * B @ A`` = the rank-r truncated SVD of
    ``W - Q``, split evenly (``B = U sqrt(S / scaling)``, ``A = sqrt(S / scaling) Vh``), so the
    adapted layer computes ``Q + (W - Q)_r``: the closest a rank-r adapter gets to ``W``. The 4-bit
    codes stay those of plain NF4 (``adapter/`` applies to any NF4 load of the model and a resume
    requantizes the same codes); only the adapters' starting values change. No random numbers are
    drawn, so data order and dropout are those of the default initialisation.

    Not PEFT's ``replace_lora_weights_loftq`` (peft 0.21): it computes on CUDA/XPU only, and it sets
    ``B @ A`` to the residual without dividing by ``scaling`` (alpha / r = 2 by default), which
    overshoots: ``W - Q - 2 P(W - Q)`` is no closer to ``W`` than ``Q`` (peft issue #1982).
    """
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    inner = model.get_base_model()
    prefix = getattr(inner, "base_model_prefix", "") + "."
    files = _tensor_files(weights_dir)
    done = 0
    for name, module in inner.named_modules():
        if not isinstance(module, LoraLayer) or not _is_4bit(module.get_base_layer()):
            continue
        base = module.get_base_layer()
        key = name + ".weight" if name + ".weight" in files else name.removeprefix(prefix) + ".weight"
        if key not in files:
            raise SftError(f"lora.init: loftq needs the unquantized weight of {name}, and the model's safetensors "
                           "have no such tensor; use lora.init: default")
        with safe_open(str(files[key]), "pt") as f:  # as loaded: in the compute (= training) dtype
            w = f.get_tensor(key).to(base.compute_dtype or torch.float32).float()
        q = _dequantized(base)
        if w.shape != q.shape:
            raise SftError(f"lora.init: loftq: {key} is {tuple(w.shape)} in the safetensors but {tuple(q.shape)} in "
                           "the loaded model; use lora.init: default")
        absorb(module, w - q)
        done += 1
    return done


@torch.no_grad()
def absorb(module: Any, error: torch.Tensor) -> None:
    """Set each active adapter of the LoRA layer ``module`` so that ``scaling * B @ A`` is the
    rank-r truncated SVD of ``error`` (out, in), split evenly between B and A."""
    u, s, vh = _top_singular(error, max(module.r[a] for a in module.active_adapters))
    for adapter in module.active_adapters:
        r, scaling = min(module.r[adapter], s.numel()), module.scaling[adapter]
        root = (s[:r] / scaling).sqrt()
        a: Any = module.lora_A[adapter].weight  # (rank, in)
        b: Any = module.lora_B[adapter].weight  # (out, rank)
        a.zero_()  # a rank above min(out, in): the extra rows stay zero
        b.zero_()
        a[:r] = root[:, None] * vh[:r]
        b[:, :r] = u[:, :r] * root


def _top_singular(e: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` largest singular triplets of ``e`` (out, in): ``u`` (out, r), ``s`` (r,) descending,
    ``vh`` (r, in), from the eigenvectors of the smaller Gram matrix (eigh in fp64): the triplets
    of a full SVD (Eckart-Young holds; tested) in 6.3 s instead of 10.8 s for SmolLM2-135M's 210
    layers on one core, and no random numbers (a randomized SVD would draw from the run's stream).

    >>> e = torch.tensor([[3.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    >>> u, s, vh = _top_singular(e, 1)
    >>> s.tolist(), (u * s) @ vh
    ([3.0], tensor([[3., 0.],
            [0., 0.],
            [0., 0.]]))
    """
    tall = e.shape[0] >= e.shape[1]
    g = e.T @ e if tall else e @ e.T  # (k, k), k = min(out, in)
    values, vectors = torch.linalg.eigh(g.double())  # ascending
    r = min(r, values.numel())
    values, vectors = values[-r:].flip(0).clamp_min(0), vectors[:, -r:].flip(1).to(e.dtype)
    s = values.sqrt()
    inv = torch.where(s > s.max() * 1e-6, 1 / s, torch.zeros_like(s)).to(e.dtype)  # a zero direction stays zero
    s = s.to(e.dtype)
    if tall:  # vectors = V (in, r): u = e V / s
        return (e @ vectors) * inv, s, vectors.T
    return vectors, s, (vectors.T @ e) * inv[:, None]  # vectors = U (out, r): vh = U^T e / s


def merged(model: Any) -> Any:
    """The plain transformers model a QLoRA ``PeftModel`` computes: every adapted linear layer
    becomes an fp32 ``nn.Linear`` holding dequantized NF4 weight + the adapter's update, any other
    4-bit layer its dequantized weight, and the quantization settings leave the config."""
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    module: Any
    base: Any
    replaced: list[str] = []
    for name, module in list(inner.named_modules()):
        if any(name.startswith(r + ".") for r in replaced):  # inside a layer already replaced (its base_layer)
            continue
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = _dequantized(base)
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).float()  # type: ignore[attr-defined]
        elif _is_4bit(module):
            base, weight = module, _dequantized(module)
        else:
            continue
        plain = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        plain.weight = torch.nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            plain.bias = torch.nn.Parameter(base.bias.detach().float(), requires_grad=False)
        owner, _, attr = name.rpartition(".")
        setattr(inner.get_submodule(owner), attr, plain)
        replaced.append(name)
    if getattr(inner.config, "quantization_config", None) is not None:
        del inner.config.quantization_config
    inner.hf_quantizer = None
    inner.is_quantized = False
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if hasattr(inner, attr):
            with contextlib.suppress(AttributeError):  # a read-only property in this transformers version
                setattr(inner, attr, False if attr.startswith("is_") else None)
    return inner.to(torch.float32)
