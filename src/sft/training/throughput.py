"""`sft bench CONFIG [--steps N] [--json]`: throughput and memory of the real training path.

The setup is ``train()``'s (``sft.training.prepare.prepare``: threads, seeds, data, precision,
model, device, compile) and the steps run exactly what ``train()`` runs (same plan of batches, same collate, loss, autocast,
clipping, AdamW and learning-rate schedule): ``cfg.train.max_steps`` is set to ``steps + 1`` so
the plan and the schedule equal those of ``sft train`` with ``--train.max_steps=N+1``, and
``tests/training/test_throughput.py`` checks that the losses match. Step 1 is the warm-up (allocator, lazy
init, compilation) and is not timed; the next ``steps`` steps are.

Definitions (also printed):
- tokens/s: non-padding tokens through forward + backward per second of the timed steps (whole
  optimizer steps: collate, forward, backward, clip, optimizer update).
- FLOPs/token: the matrix FLOPs a step really needs (``training_flops``): 6 x the body's
  parameters per token (2 forward + 4 backward; 4 x for LoRA, whose frozen weights need no weight
  gradient), plus the output head only at trained tokens (sft computes no logits elsewhere).
  Embedding lookups are not FLOPs. Attention's T^2 term is left out, so MFU is slightly low.
  (The first `sft bench` section of bench/RESULTS.md, on a loaded machine, used the old count,
  6 x all parameters at every token, which counted the embedding matrix as if it were a matmul.)
- peak FLOP/s: the best of a few square matmuls in the run's precision, measured on the spot
  (2048 x 2048, or smaller where one product would take too long, e.g. bf16 without avx512_bf16).
- compile: ``train.compile: auto`` is decided as for a long run (``sft train`` of a short run
  may not compile; see ``sft.training.precision.use_compile``).
- compile s: compiled runs (``train.compile``) compile at the warm-up step; this is the warm-up
  step's time minus the median timed step (so it is not in tokens/s, and is an estimate).
- profile (``--profile``): the timed steps run under torch.profiler (a little slower), and
  ``sft.training.profile`` groups their time into matmul, attention, elementwise, loss,
  optimizer, data and other.
- time to first step: from the start of ``run_bench`` (data, model load, warm-up step), and also
  from process start.
- peak RSS: ``getrusage`` max resident set of this process (includes anything it did before).
- peak VRAM (CUDA): ``torch.cuda.max_memory_allocated`` from model load to the last step; MFU on a
  GPU is against the measured 8192^2 matmul, and ``spec_peak_flops`` gives the datasheet peak.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import TypedDict

import torch

from sft.config import Config
from sft.errors import SftError
from sft.lm.compiled import is_compiled
from sft.lm.loss import unwrap
from sft.runtime import local, this_device
from sft.training.optim import lr_at
from sft.training.prepare import prepare
from sft.training.profile import format_profile, group_profile
from sft.training.step import train_step


class Machine(TypedDict):
    cpu_model: str
    cores: int | None
    torch_threads: int
    cpu_flags: list[str]
    device: str
    torch_version: str
    python: str
    date: str
    load_avg_1m: float


class BenchResult(TypedDict, total=False):
    """What ``sft bench --json`` prints (see the module docstring for each figure's definition)."""

    tokens_per_s: float
    mfu: float
    peak_flops: int
    peak_matmul_size: int
    flops_per_token: int
    padding_efficiency: float
    peak_rss_gb: float
    peak_vram_gb: float | None  # torch.cuda.max_memory_allocated over the whole bench; None on CPU
    spec_peak_flops: float | None  # the GPU's dense bf16 datasheet peak (GPU_BF16_PEAK), when known
    attention: str
    time_to_first_step_s: float
    time_to_first_step_from_process_start_s: float | None
    losses: list[float]
    steps: int
    step_seconds: list[float]
    tokens: int
    trained_tokens: int
    precision: str
    method: str
    compile: bool  # compiled regions in use after the run (false after a compile fallback)
    compile_s: float  # warm-up step minus the median timed step (compilation, when compile is on)
    warmup_step_s: float
    profile: dict[str, float] | None  # seconds per share over the timed steps (--profile), else None
    gradient_checkpointing: bool
    packing: bool
    batch_size: int
    grad_accum: int
    max_length: int
    model: str
    params: int
    trainable_params: int
    machine: Machine


KEYS = (
    "tokens_per_s", "mfu", "peak_flops", "padding_efficiency", "peak_rss_gb", "time_to_first_step_s",
    "losses", "steps", "precision",
)


def training_flops(body_params: int, head_params: int, tokens: int, trained: int, method: str,
                   head_trainable: bool) -> int:
    """Matrix FLOPs a step really needs: 6 x body params per token (4 x for LoRA: frozen weights
    get no weight gradient), and the output head only at trained positions (sft computes no
    logits elsewhere): 2 (logits) + 2 (input grad) + 2 if the head is trained. Embedding lookups
    are not FLOPs, so the embedding matrix counts once, as the (tied) head. Attention scores are
    left out (small at these lengths), so this slightly understates the work.

    >>> training_flops(100, 10, tokens=4, trained=2, method="full", head_trainable=True)
    2520
    >>> training_flops(100, 10, tokens=4, trained=2, method="lora", head_trainable=False)
    1680
    """
    body = (4 if method in ("lora", "qlora") else 6) * body_params * tokens
    head = (6 if head_trainable else 4) * head_params * trained
    return body + head


def model_flop_utilisation(tokens_per_s: float, flops_token: int, peak_flops: float) -> float:
    """Achieved training FLOP/s as a fraction of the measured peak.

    >>> model_flop_utilisation(100.0, 600, 1.2e5)
    0.5
    """
    return tokens_per_s * flops_token / peak_flops if peak_flops > 0 else 0.0


def padding_efficiency(real_tokens: int, tensor_tokens: int) -> float:
    """Share of the token positions pushed through the model that are real (not padding).

    >>> padding_efficiency(1500, 2000)
    0.75
    """
    return real_tokens / tensor_tokens if tensor_tokens else 0.0


def median(xs: list[float]) -> float:
    """Middle value (mean of the two middle values for an even count).

    >>> median([3.0, 1.0, 2.0]), median([4.0, 1.0, 2.0, 3.0])
    (2.0, 2.5)
    """
    s = sorted(xs)
    if not s:
        return 0.0
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, FLOP/s, by device-name substring.
GPU_BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                 "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def gpu_spec_peak(name: str) -> float | None:
    """Datasheet dense bf16 peak of a GPU by name (the first key contained in it).

    >>> gpu_spec_peak("NVIDIA H100 80GB HBM3"), gpu_spec_peak("a toaster")
    (989000000000000.0, None)
    """
    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(dtype: torch.dtype, size: int = 2048, budget_s: float = 2.0,
                      device: torch.device | None = None) -> tuple[float, int]:
    """Best FLOP/s of square ``size`` matmuls in ``dtype`` on ``device`` (CPU by default), and the
    size actually used.

    Starts small and doubles up to ``size``; stops early when one product takes over
    ``budget_s / 4`` (bf16 on a CPU without avx512_bf16 runs ~40x slower than fp32).
    """
    device = device or torch.device("cpu")
    best, used, n = 0.0, 0, 256
    while n <= size:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        _sync(device)
        t = time.perf_counter()
        a @ b  # warm-up
        _sync(device)
        first = time.perf_counter() - t
        reps = 3 if first < budget_s / 4 else 1
        rate = 2 * n**3 / first
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            _sync(device)
            rate = max(rate, 2 * n**3 / (time.perf_counter() - t))
        best, used = rate, n  # the largest size tried is the representative one
        if first > budget_s / 4:
            break
        n *= 2
    return best, used


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))


def machine_info() -> Machine:
    device = this_device()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": _cpu_flags(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), else None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def bench(cfg: Config, steps: int, profile: bool = False) -> BenchResult:
    """Run 1 warm-up + ``steps`` timed optimizer steps of ``cfg``'s training; return the figures.
    ``profile``: time the steps under torch.profiler and group their time (``sft.training.profile``)."""

    if steps < 1:
        raise SftError(f"--steps: {steps} must be at least 1")
    t_start = time.perf_counter()
    age_at_start = _process_age_s()
    rt = local(cfg)
    device = rt.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    precision = rt.precision
    total_steps = steps + 1
    prepared = prepare(cfg, rt, total_steps, long_run=True)  # the setup of sft train: threads, seeds, data, model, device
    model, optimizer = prepared.model, prepared.optimizer
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # The same step as train()'s loop (sft.training.step.train_step), minus logging and checkpoints.
    def one_step(step: int) -> tuple[float, int, int, int]:
        r = train_step(model, optimizer, prepared.plan[step], prepared.data.examples, cfg, prepared.pad_id, rt,
                       lr_at(step, total_steps, cfg.train))
        return r.loss, r.tokens, r.tensor_tokens, r.trained_tokens

    t_warm = time.perf_counter()
    one_step(0)
    _sync(device)
    warmup_s = time.perf_counter() - t_warm
    first_step_s = time.perf_counter() - t_start
    losses: list[float] = []
    step_times: list[float] = []
    real_tokens = tensor_tokens = trained_tokens = 0
    prof = _profiler(device) if profile else contextlib.nullcontext()
    with prof:
        for step in range(1, total_steps):
            t = time.perf_counter()
            loss, real, tensor, trained = one_step(step)
            trained_tokens += trained
            _sync(device)
            step_times.append(time.perf_counter() - t)
            losses.append(loss)
            real_tokens += real
            tensor_tokens += tensor
    shares = group_profile(prof.events(), sum(step_times) * 1e6) if isinstance(prof, torch.profiler.profile) else None

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    vram = round(torch.cuda.max_memory_allocated(device) / 1024**3, 3) if device.type == "cuda" else None
    if device.type == "cuda":  # a GPU needs bigger products to reach its peak
        peak, peak_size = matmul_peak_flops(dtype, size=8192, device=device)
    else:
        peak, peak_size = matmul_peak_flops(dtype)
    spec = gpu_spec_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens_per_s = real_tokens / sum(step_times)
    head = unwrap(model).get_output_embeddings().weight
    head_params = head.numel()
    flops = training_flops(n_params - head_params, head_params, real_tokens, trained_tokens, cfg.train.method,
                           head.requires_grad)
    fpt = round(flops / max(1, real_tokens))
    return {
        "tokens_per_s": round(tokens_per_s, 2),
        "mfu": round(model_flop_utilisation(tokens_per_s, fpt, peak), 4),
        "peak_flops": round(peak),
        "peak_matmul_size": peak_size,
        "flops_per_token": fpt,
        "padding_efficiency": round(padding_efficiency(real_tokens, tensor_tokens), 4),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "peak_vram_gb": vram,
        "spec_peak_flops": spec,
        "attention": unwrap(model).config._attn_implementation,
        "time_to_first_step_s": round(first_step_s, 2),
        "time_to_first_step_from_process_start_s": (
            round(age_at_start + first_step_s, 2) if age_at_start is not None else None
        ),
        "losses": [round(x, 6) for x in losses],
        "steps": steps,
        "step_seconds": [round(x, 3) for x in step_times],
        "tokens": real_tokens,
        "trained_tokens": trained_tokens,
        "precision": precision,
        "method": cfg.train.method,
        "compile": is_compiled(model),
        "compile_s": round(max(0.0, warmup_s - median(step_times)), 2),
        "warmup_step_s": round(warmup_s, 2),
        "profile": {k: round(v, 4) for k, v in shares.items()} if shares is not None else None,
        "gradient_checkpointing": bool(getattr(unwrap(model), "is_activation_checkpointing", False)),  # auto resolved
        "packing": cfg.data.packing,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "max_length": cfg.data.max_length,
        "model": cfg.model,
        "params": n_params,
        "trainable_params": n_trainable,
        "machine": machine_info(),
    }


def format_report(r: BenchResult) -> str:
    m = r["machine"]
    times = r["step_seconds"]
    lines = [
        f"model {r['model']} | {r['method']} | {r['precision']} | packing {r['packing']} | "
        f"batch {r['batch_size']}x{r['grad_accum']} | max_length {r['max_length']} | compile {r['compile']}",
        f"tokens/s          {r['tokens_per_s']:.1f}  (non-padding tokens through fwd+bwd, {r['steps']} timed steps; "
        f"step s: best {min(times):.2f}, median {median(times):.2f})",
        f"MFU               {r['mfu'] * 100:.1f}%  ({r['flops_per_token'] / 1e6:.0f}M FLOPs/token actually needed: "
        f"{'4' if r['method'] == 'lora' else '6'} x body params + the head at trained tokens only; "
        f"{r['params'] / 1e6:.1f}M params; peak {r['peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"{r['precision']} {r['peak_matmul_size']}^2 matmul)",
        f"padding eff.      {r['padding_efficiency'] * 100:.1f}%",
        f"peak RSS          {r['peak_rss_gb']:.2f} GB"
        + (f" | peak VRAM {r['peak_vram_gb']:.2f} GB (max allocated)" if r.get("peak_vram_gb") is not None else ""),
        f"compile           {r['compile_s']:.1f} s (warm-up step {r['warmup_step_s']:.1f} s minus a median step)",
        f"first step        {r['time_to_first_step_s']:.1f} s from bench start"
        + (f", {r['time_to_first_step_from_process_start_s']:.1f} s from process start"
           if r["time_to_first_step_from_process_start_s"] is not None else ""),
        f"losses            {', '.join(f'{x:.4f}' for x in r['losses'])}",
        f"machine           {m['cpu_model']}, {m['cores']} cores, {m['torch_threads']} threads, torch "
        f"{m['torch_version']}, load {m['load_avg_1m']}, {m['date']}",
    ]
    if r.get("profile"):
        lines += ["", "where a timed step goes (torch.profiler, self time of each operator):",
                  format_profile(r["profile"] or {}, r["steps"])]
    return "\n".join(lines)


def _profiler(device: torch.device) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def run_bench(cfg: Config, steps: int = 8, as_json: bool = False, profile: bool = False) -> int:
    """CLI entry: print the figures (a table, or one JSON object); returns the exit status."""
    result = bench(cfg, steps, profile)
    print(json.dumps(result) if as_json else format_report(result), flush=True)
    return 0
