"""Atomic checkpoints and exact resume. Safetensors and JSON only: nothing is ever unpickled.

``output_dir/checkpoints/step-N/`` holds the trainable weights, the optimizer state, the RNG
states and ``state.json`` (step, counters). It is written under a temporary name and renamed
into place, so a crash mid-save leaves the previous checkpoint intact and never a partial one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sft.errors import SftError

STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(target: Path, write: Any) -> None:
    """``write(tmp)`` into a sibling temporary folder, then rename it to ``target``."""
    tmp = target.parent / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = None
    if target.exists():  # replace: move the old one aside first, delete after the swap
        old = target.parent / f".old-{target.name}"
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    ckpt_root: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int
) -> Path:
    """Write ``ckpt_root/step-{step}`` atomically and keep only the newest ``keep``."""
    target = ckpt_root / f"step-{step}"

    def write(d: Path) -> None:
        save_file(trainable_state(model), str(d / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(d / "optimizer.safetensors"))
        (d / "optimizer.json").write_text(json.dumps(opt_meta))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, str(d / "rng.safetensors"))
        py_state = random.getstate()
        full = {**state, "step": step, "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
        (d / "state.json").write_text(json.dumps(full, indent=1))

    ckpt_root.mkdir(parents=True, exist_ok=True)
    atomic_write_dir(target, write)
    if keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states; return the saved ``state.json``."""
    try:
        weights = load_file(str(path / "model.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise SftError(f"{path}: checkpoint does not match the model ({missing[0]} unknown); "
                           "was the config changed? Resume with the same model and train.method")
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
        _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")),
                        json.loads((path / "optimizer.json").read_text()))
        rng = load_file(str(path / "rng.safetensors"))
        state: dict[str, Any] = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise SftError(f"{path}: checkpoint is unreadable ({e}); delete it to resume from an older one") from None
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state
