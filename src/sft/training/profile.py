"""`sft bench --profile`: where the time of a step goes, from torch.profiler's events.

Each operator's *self* time (its time minus its children's) goes to one share:

- data: anything under the ``sft.data`` range (collate, counts, copy to the device);
- optimizer: under ``sft.optimizer`` (clipping, AdamW, zeroing the gradients);
- loss: under ``sft.loss`` (the output head and the chunked cross-entropy, forward and its
  gradient pieces, which ``sft.lm.loss`` computes in the forward pass);
- matmul: matrix products elsewhere (``aten::mm``, ``addmm``, ``bmm``, oneDNN linear ...);
- attention: scaled-dot-product attention kernels, forward and backward;
- elementwise: every other operator (norms, activations, rotary, copies, casts) and the fused
  kernels of compiled graphs (their self time is the fused loops; their matmuls are children);
- other: autograd's bookkeeping events and the step's wall time that no operator covers
  (Python, waiting).

Shares are of the profiled steps' wall time; the profiler itself slows a step down a little.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sft.lm.loss import PROFILE_LOSS
from sft.training.step import PROFILE_DATA, PROFILE_OPTIMIZER

SHARES = ("matmul", "attention", "elementwise", "loss", "optimizer", "data", "other")
_RANGES = {PROFILE_DATA: "data", PROFILE_OPTIMIZER: "optimizer", PROFILE_LOSS: "loss"}
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
           "aten::addmv", "aten::mv", "aten::dot"}


def op_share(name: str) -> str:
    """The share of an operator outside the sft ranges, by name.

    >>> [op_share(n) for n in ("aten::mm", "mkldnn::_linear_pointwise", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::mul")]
    ['matmul', 'matmul', 'attention', 'elementwise']
    >>> op_share("autograd::engine::evaluate_function: MmBackward0")
    'other'
    """
    if name.startswith("autograd::") or name.endswith(("Backward0", "Backward1")):
        return "other"  # autograd's bookkeeping around each backward function
    if name in _MATMUL or ("mkldnn" in name and ("linear" in name or "mm" in name)):
        return "matmul"
    if "scaled_dot_product" in name or "attention" in name.lower():
        return "attention"
    return "elementwise"


def _share(event: Any) -> str:
    parent = event
    while parent is not None:
        if parent.name in _RANGES:
            return _RANGES[parent.name]
        parent = parent.cpu_parent
    return op_share(event.name)


def group_profile(events: Iterable[Any], wall_us: float) -> dict[str, float]:
    """Seconds per share (``SHARES``) of profiler ``events`` (FunctionEvents with ``name``,
    ``self_cpu_time_total`` in microseconds and ``cpu_parent``) over ``wall_us`` of steps."""
    out = dict.fromkeys(SHARES, 0.0)
    for e in events:
        if e.name in _RANGES or e.self_cpu_time_total <= 0:
            continue
        out[_share(e)] += e.self_cpu_time_total / 1e6
    out["other"] += max(0.0, wall_us / 1e6 - sum(out.values()))
    return out


def format_profile(seconds: dict[str, float], steps: int) -> str:
    """A table: share, seconds per step, percent of the step.

    >>> print(format_profile({"matmul": 3.0, "other": 1.0}, steps=2))
    share        s/step   % of step
    matmul        1.500       75.0%
    other         0.500       25.0%
    """
    total = sum(seconds.values()) or 1.0
    lines = ["share        s/step   % of step"]
    for k in SHARES:
        if k in seconds:
            lines.append(f"{k:<12} {seconds[k] / steps:>6.3f}   {100 * seconds[k] / total:>8.1f}%")
    return "\n".join(lines)
