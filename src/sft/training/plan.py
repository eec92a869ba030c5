"""`sft plan CONFIG`: the peak memory of a training run, estimated from the model's config alone.

No weights load: the estimate is arithmetic on the architecture (``Shape``) and the train
settings. Per process, in bytes:

    runtime        Python, torch, transformers and peft once imported (RUNTIME_BYTES, measured), and
                   on a CPU the memory glibc's allocator keeps after freeing (CPU_SLACK_BYTES, fitted to
                   bench/memory_table.py: with MALLOC_MMAP_THRESHOLD_=131072 the LoRA + checkpointing
                   row of Qwen2.5-0.5B peaked at 2.58 GB instead of 4.02, its step 80% slower); QLoRA
                   with checkpointing on a CPU keeps more (QLORA_HEAP_BYTES a layer, token and hidden unit)
    weights        full/LoRA: every parameter in the training dtype (2 bytes bf16, 4 fp32);
                   QLoRA: the decoder's linear weights in NF4 (``nf4_bytes`` a parameter: 4 bits and an
                   fp32 scale per block of lora.quant_blocksize), the rest (embeddings, head, norms)
                   in the training dtype
    adapters       LoRA/QLoRA: r x (in + out) fp32 parameters per adapted linear layer
    gradients      one per trainable parameter, in its dtype
    optimizer      AdamW: two fp32 moments per trainable parameter, plus an fp32 master copy of a
                   bf16 weight (sft.training.optim.MasterAdamW): 12 bytes (bf16), 8 (fp32)
    activations    what autograd keeps for the backward pass, per layer and token (``layer_bytes``,
                   counted tensor by tensor from transformers' Llama/Qwen2 layers); with
                   checkpointing, each layer's input plus one layer's activations while it is recomputed
    logits         the chunked loss (sft.lm.loss): two fp32 chunks of CHUNK_BYTES, and when the output
                   head trains its fp32 gradient and the d/dlogits kept for its matmul (GRAD_GROUP_BYTES)
    step           the optimizer step's transient fp32 copy of the gradients (4 bytes a trainable parameter)

    peak = runtime + weights + adapters + optimizer + max(activations + logits, gradients + step)

The backward pass frees activations as gradients appear, so the two never peak together.
Several processes on one machine (``--nproc``) each hold all of it (DDP); FSDP2 divides weights,
gradients and optimizer state by the number of processes.

``train.gradient_checkpointing: auto`` asks ``needs_checkpointing``: on when the run without it
does not fit the device (RAM on a CPU, the GPU's memory on CUDA).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sft.config import Config
from sft.errors import SftError

GB = 1e9
RUNTIME_BYTES = int(0.75 * GB)  # RSS of `python -c "import torch, transformers, peft"` plus the data here
CPU_SLACK_BYTES = int(1.2 * GB)  # freed but kept by glibc malloc (arenas, dynamic mmap threshold); fitted
# QLoRA + checkpointing on a CPU: every pass dequantizes each linear weight into a transient bf16
# copy, and glibc's heap keeps the holes these copies and the recomputed activations leave between
# the checkpointed layer inputs. Measured at the Qwen2.5-1.5B peak (bench/RESULTS.md): 2.3 GB of live
# allocations and 2.9-3.1 GB of free heap kept (LoRA: 1.5 GB, covered by CPU_SLACK_BYTES). Counted
# per layer x token x hidden unit, fitted to the six QLoRA + checkpointing rows of
# bench/memory_table.py (every row within 15% for 10.9-16.5 bytes). Without checkpointing the
# activations reuse those holes (those rows are within +2..+10% without it).
QLORA_HEAP_BYTES = 13
CHUNK_BYTES = 256 * 1024 * 1024  # sft.lm.loss.CHUNK_BYTES (fp32 logits of one chunk)
GRAD_GROUP_BYTES = 256 * 1024 * 1024  # sft.lm.loss.GRAD_GROUP_BYTES (d/dlogits in the training dtype)
FIT_FRACTION = 0.9  # a run "fits" when its peak is at most this share of the device's memory
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that memory depends on (from its config.json)."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # the output head is the embedding matrix
    attn_bias: bool  # q/k/v projections have biases (Qwen2)
    norms: int = 2  # RMSNorms per layer (Gemma 3 has 4)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Weights of the decoder's linear layers, all layers (what QLoRA quantizes)."""
        return self.layers * sum(a * b for a, b in self.linear_dims().values())

    def params(self) -> int:
        """All parameters: embeddings, linear weights, biases, norms, final norm, untied head."""
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.attn_bias else 0
        per_layer_other = bias + self.norms * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.linear_params() + self.layers * per_layer_other + self.hidden + head


def shape_of(hf: dict[str, Any], where: str = "config.json") -> Shape:
    """``Shape`` from a transformers config (a dict of config.json; ``text_config`` for multimodal ones).

    >>> s = shape_of({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
    ...               "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True})
    >>> s.head_dim, s.params()
    (16, 80448)
    """
    hf = hf.get("text_config") or hf
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        model_type = str(hf.get("model_type", ""))
        return Shape(
            vocab=int(hf["vocab_size"]), hidden=hidden, layers=int(hf["num_hidden_layers"]),
            intermediate=int(hf["intermediate_size"]), heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            tied=bool(hf.get("tie_word_embeddings", False)),
            attn_bias=bool(hf.get("attention_bias", False)) or model_type == "qwen2",
            norms=4 if model_type.startswith("gemma") else 2,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SftError(f"{where}: cannot read the model's sizes ({type(e).__name__}: {e}); sft plan needs "
                       "hidden_size, num_hidden_layers, intermediate_size, num_attention_heads and vocab_size") from None


# ---------------------------------------------------------------------------------------------
# the estimate


@dataclass(frozen=True)
class Settings:
    """What a run's memory depends on besides the model."""

    method: str  # full | lora | qlora
    precision: str  # bf16 | fp32
    batch_size: int
    max_length: int
    checkpointing: bool
    lora_r: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LINEARS
    processes: int = 1
    parallel: str = "ddp"  # ddp | fsdp (with processes > 1)
    train_head: bool = True  # full fine-tuning trains the (tied) head unless embeddings are frozen
    quant_blocksize: int = 32  # qlora: lora.quant_blocksize
    double_quant: bool = True  # qlora: lora.double_quant

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_length


def settings_of(cfg: Config, precision: str, processes: int = 1, checkpointing: bool | None = None) -> Settings:
    """``Settings`` from a config (``precision`` resolved: bf16 or fp32)."""
    targets = cfg.lora.target_modules
    names = LINEARS if targets == "all-linear" else tuple(t for t in ([targets] if isinstance(targets, str) else targets)
                                                          if t in LINEARS)
    ckpt = bool(cfg.train.gradient_checkpointing is True) if checkpointing is None else checkpointing
    return Settings(cfg.train.method, precision, cfg.train.batch_size, cfg.data.max_length, ckpt,
                    cfg.lora.r, cfg.lora.dropout, names, processes,
                    "fsdp" if cfg.train.parallel == "fsdp" else "ddp", not cfg.train.freeze_embeddings,
                    cfg.lora.quant_blocksize, cfg.lora.double_quant)


def nf4_bytes(blocksize: int, double_quant: bool) -> float:
    """Bytes a weight takes in bitsandbytes' NF4: 4 bits, plus one fp32 absmax per ``blocksize``
    weights, or with double quantization a uint8 absmax and one fp32 scale per 256 of those.

    >>> nf4_bytes(64, False), nf4_bytes(32, False), round(nf4_bytes(32, True), 4)
    (0.5625, 0.625, 0.5317)
    """
    return 0.5 + ((1 + 4 / 256) / blocksize if double_quant else 4 / blocksize)


def layer_bytes(s: Shape, st: Settings) -> int:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing).

    Counted tensor by tensor (torch.autograd.graph.saved_tensors_hooks on transformers' Llama and
    Qwen2 layers, sdpa attention): each RMSNorm keeps its fp32 input and 1/rms, and, when its
    weight trains, its normalized input and output; attention keeps q, k, v after RoPE, its output
    and an fp32 log-sum-exp per head; the MLP keeps gate, silu(gate) and up (and down's input when
    its weight trains). A LoRA adapter keeps its fp32 input twice (the cast and dropout) and its
    rank-r middle. ``tests/training/test_plan.py`` checks this against the hooks.
    """
    a = 2 if st.precision == "bf16" else 4
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    frozen = st.method in ("lora", "qlora")
    norm = 4 * s.hidden + 4 + (0 if frozen else 2 * a * s.hidden)
    attention = a * (2 * q + 2 * kv) + 4 * s.heads
    mlp = a * s.intermediate * (3 if frozen else 4)
    adapters = 0
    if frozen:
        dims = s.linear_dims()
        per_in = 8 if st.lora_dropout > 0 else 4
        adapters = sum(per_in * dims[t][0] + 4 * st.lora_r for t in st.lora_targets)
    return s.norms * norm + attention + mlp + adapters


@dataclass(frozen=True)
class Estimate:
    """The estimate's parts (bytes, one process) and the verdict."""

    params: int
    trainable: int
    runtime: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    step: int
    processes: int
    budget: int  # the device's memory (all processes together on a CPU; one GPU on CUDA)
    device: str  # "cpu" | "cuda"

    @property
    def per_process(self) -> int:
        return (self.runtime + self.weights + self.adapters + self.optimizer
                + max(self.activations + self.logits, self.gradients + self.step))

    @property
    def peak(self) -> int:
        """What must fit the budget: all processes on a CPU, one on a GPU."""
        return self.per_process * (self.processes if self.device == "cpu" else 1)

    @property
    def fits(self) -> bool:
        return self.peak <= FIT_FRACTION * self.budget


def estimate(s: Shape, st: Settings, budget: int, device: str = "cpu") -> Estimate:
    """Peak memory of one training process (see the module docstring for each part)."""
    a = 2 if st.precision == "bf16" else 4
    params = s.params()
    linear = s.linear_params()
    dims = s.linear_dims()
    lora = s.layers * sum(st.lora_r * (dims[t][0] + dims[t][1]) for t in st.lora_targets)
    share = st.processes if st.parallel == "fsdp" and st.processes > 1 else 1
    if st.method == "full":
        trainable = params if st.train_head else params - s.vocab * s.hidden * (1 if s.tied else 2)
        weights, adapters = a * params, 0
        grads = a * trainable
        optimizer = (12 if a == 2 else 8) * trainable
    else:
        trainable = lora
        nf4 = nf4_bytes(st.quant_blocksize, st.double_quant)
        weights = int(nf4 * linear) + a * (params - linear) if st.method == "qlora" else a * params
        adapters, grads, optimizer = 4 * lora, 4 * lora, 8 * lora
    per_layer = layer_bytes(s, st) * st.tokens
    if st.checkpointing:  # each layer's input, and one layer recomputed at a time
        acts = s.layers * a * s.hidden * st.tokens + per_layer
    else:
        acts = s.layers * per_layer
    acts += 2 * a * s.hidden * st.tokens  # the final norm's output and the loss's gradient of it
    head = st.method == "full" and st.train_head
    head_grad = 4 * s.vocab * s.hidden + min(GRAD_GROUP_BYTES, a * s.vocab * st.tokens) if head else 0
    logits = 2 * min(CHUNK_BYTES, 4 * s.vocab * st.tokens) + head_grad
    runtime = RUNTIME_BYTES + (CPU_SLACK_BYTES if device == "cpu" else 0)
    if device == "cpu" and st.method == "qlora" and st.checkpointing:
        runtime += QLORA_HEAP_BYTES * s.layers * st.tokens * s.hidden
    return Estimate(params, trainable, runtime, weights // share, adapters, grads // share,
                    optimizer // share, acts, logits, 4 * trainable // share, st.processes, budget, device)


# ---------------------------------------------------------------------------------------------
# the machine, the model's config, and what to change


def device_memory() -> tuple[int, str]:
    """(bytes, "cuda" | "cpu"): the first GPU's memory, else this machine's RAM."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), "cuda"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpu"


def model_config(cfg: Config) -> dict[str, Any]:
    """The model's config.json as a dict, without loading (or downloading) weights."""
    from sft.models.load import resolve

    src = resolve(cfg.model, cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if src.is_gguf:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(src.path.parent), gguf_file=src.path.name).to_dict()  # type: ignore[no-any-return]
    path = Path(src.path) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    except (OSError, ValueError) as e:
        raise SftError(f"{path}: cannot read the model's config ({e}); check the model directory") from None


def suggest(s: Shape, st: Settings, budget: int, device: str) -> tuple[str, Estimate] | None:
    """The cheapest change that makes the run fit, in this order: checkpointing (same result,
    ~1/3 more compute), a smaller micro-batch with more accumulation (same result, slower), LoRA,
    QLoRA, and those combined. None when nothing here fits."""
    steps: list[tuple[str, Settings]] = []
    if not st.checkpointing:
        steps.append(("train.gradient_checkpointing: true", replace(st, checkpointing=True)))
    b = st.batch_size
    while b > 1:
        b //= 2
        for ck in ((st.checkpointing,) if st.checkpointing else (False, True)):
            extra = ", train.gradient_checkpointing: true" if ck and not st.checkpointing else ""
            steps.append((f"train.batch_size: {b} with train.grad_accum x{st.batch_size // b}{extra}",
                          replace(st, batch_size=b, checkpointing=ck)))
    for method in ("lora", "qlora"):
        if st.method == "full" or (st.method == "lora" and method == "qlora"):
            steps.append((f"train.method: {method}", replace(st, method=method)))
            steps.append((f"train.method: {method}, train.gradient_checkpointing: true",
                          replace(st, method=method, checkpointing=True)))
            steps.append((f"train.method: {method}, train.gradient_checkpointing: true, train.batch_size: 1 "
                          f"with train.grad_accum x{st.batch_size}",
                          replace(st, method=method, checkpointing=True, batch_size=1)))
    for text, candidate in steps:
        e = estimate(s, candidate, budget, device)
        if e.fits:
            return text, e
    return None


def needs_checkpointing(hf: dict[str, Any], cfg: Config, precision: str) -> tuple[bool, Estimate]:
    """``train.gradient_checkpointing: auto``: True when the run without checkpointing does not fit."""
    budget, device = device_memory()
    e = estimate(shape_of(hf), settings_of(cfg, precision, checkpointing=False), budget, device)
    return not e.fits, e


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def report(cfg: Config, hf: dict[str, Any], precision: str, processes: int) -> tuple[str, dict[str, Any]]:
    """The text `sft plan` prints and the same figures as a dict (``--json``)."""
    budget, device = device_memory()
    s = shape_of(hf)
    st = settings_of(cfg, precision, processes)
    auto = cfg.train.gradient_checkpointing == "auto"
    if auto:
        st = replace(st, checkpointing=not estimate(s, st, budget, device).fits)
    e = estimate(s, st, budget, device)
    what = "RAM" if device == "cpu" else "GPU memory"
    lines = [
        f"model: {cfg.model} ({e.params / 1e6:.1f}M parameters: {s.layers} layers, hidden {s.hidden}, "
        f"vocab {s.vocab})",
        f"run: method {st.method} | {st.precision} | {processes} process{'es' if processes > 1 else ''}"
        f"{' (' + st.parallel + ')' if processes > 1 else ''} | micro-batch {st.batch_size} x {st.max_length} tokens"
        f" | checkpointing {'on' if st.checkpointing else 'off'}{' (auto)' if auto else ''}",
        f"  runtime          {_gb(e.runtime)}" + (" (with the allocator's slack)" if device == "cpu" else ""),
        f"  weights          {_gb(e.weights)}" + (" (NF4 linear layers)" if st.method == "qlora" else ""),
    ]
    if e.adapters:
        lines.append(f"  adapters         {_gb(e.adapters)} ({e.trainable / 1e6:.2f}M trainable)")
    lines += [
        f"  gradients        {_gb(e.gradients)}",
        f"  optimizer state  {_gb(e.optimizer)}",
        f"  activations      {_gb(e.activations)}",
        f"  logits (chunked) {_gb(e.logits)}",
        f"  optimizer step   {_gb(e.step)}",
        f"peak: {_gb(e.peak)} estimated{' for ' + str(processes) + ' processes' if processes > 1 and device == 'cpu' else ''}"
        f" of {_gb(budget)} {what}: {'fits' if e.fits else 'does NOT fit'} "
        f"(fits = at most {FIT_FRACTION:.0%} of it)",
    ]
    fix = None if e.fits else suggest(s, st, budget, device)
    if not e.fits:
        lines.append(f"cheapest change that fits: {fix[0]} (peak {_gb(fix[1].peak)})" if fix
                     else "nothing here fits: use a smaller model, a shorter data.max_length or a bigger machine")
    data = {"model": cfg.model, "shape": asdict(s), "settings": asdict(st), "device": device, "budget": budget,
            "parts": {k: v for k, v in asdict(e).items() if k not in ("processes", "budget", "device")},
            "peak": e.peak, "fits": e.fits, "suggestion": fix[0] if fix else None}
    return "\n".join(lines), data


def run_plan(cfg: Config, processes: int = 1, as_json: bool = False) -> int:
    """`sft plan CONFIG`: print the estimate; exit 0 when it fits, 1 when it does not."""
    from sft.runtime import resolve_precision

    text, data = report(cfg, model_config(cfg), resolve_precision(cfg), processes)
    print(json.dumps(data, indent=1) if as_json else text)
    return 0 if data["fits"] else 1


def use_checkpointing(cfg: Config, hf: dict[str, Any]) -> bool:
    """``train.gradient_checkpointing`` resolved for the model whose config is ``hf``: ``auto`` asks
    the plan (and says what it decided)."""
    if cfg.train.gradient_checkpointing != "auto":
        return bool(cfg.train.gradient_checkpointing)
    from sft.runtime import resolve_precision

    on, e = needs_checkpointing(hf, cfg, resolve_precision(cfg))
    where = "RAM" if e.device == "cpu" else "GPU memory"
    print(f"gradient checkpointing: {'on' if on else 'off'} (auto: without it the plan's peak is {_gb(e.peak)} "
          f"of {_gb(e.budget)} {where})", flush=True)
    return on
