"""Atomic checkpoints and exact resume. Safetensors and JSON only: nothing is ever unpickled.

``output_dir/checkpoints/step-N/`` holds the trainable weights, the optimizer state, the RNG
states (one per rank) and ``state.json`` (step, counters, world size, the config it was made
with). It is written under a temporary name and renamed into place, so a crash mid-save leaves
the previous checkpoint intact and never a partial one.

One process and DDP: rank 0 writes ``model.safetensors`` and ``optimizer.safetensors`` (every
rank holds the same values). FSDP2: every rank writes its own shards with
``torch.distributed.checkpoint`` (its safetensors writer, offsets in each file's JSON header:
``model/`` and ``optimizer/``), and a resume needs the same world size.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sft.atomic import atomic_write_dir, fsync_tree, rename_into_place
from sft.config import Config, to_dict
from sft.errors import SftError
from sft.runtime import Runtime
from sft.training.distributed import is_sharded
from sft.training.state import RunState

STEP_DIR = re.compile(r"^step-(\d+)$")


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
            elif isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()):
                # bitsandbytes' 8-bit AdamW nests its quantized moments in one dict per parameter
                tensors.update({f"{pid}.{k}.{name}": t.contiguous() for name, t in v.items()})
                meta["state"][str(pid)][k] = {"tensors": list(v)}
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{pid}.{k}"] if v == "tensor" else
                               {n: tensors[f"{pid}.{k}.{n}"] for n in v["tensors"]} if isinstance(v, dict) and "tensors" in v
                               else v) for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---------------------------------------------------------------------------------------------
# resume must see the run it continues

# Keys that may change between a run and its resume: where it writes, how often it saves or logs,
# evaluation (except eval.split, which decides the training rows), threads, compile.
RESUMABLE_CHANGES = ("output_dir", "data.cache_dir", "train.save_every", "train.keep_checkpoints",
                     "train.log_every", "train.report_to", "train.threads", "train.compile", "train.on_nan",
                     "eval.", "sweep.")

# Keys added after checkpoints were first written, and the value that reproduces how a run behaved
# before the key existed: a checkpoint without the key resumes when the run has that value.
ADDED_KEYS: dict[str, Any] = {"train.bf16_rounding": "nearest", "lora.init": "default", "lora.quant_blocksize": 64}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "grid":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(cfg: Config) -> dict[str, Any]:
    """The keys of ``cfg`` a resume must keep (flat, dotted), as JSON values.

    >>> from sft.config import Config
    >>> c = resume_config(Config())
    >>> "train.lr" in c, "train.save_every" in c, "eval.split" in c, "eval.every" in c
    (True, False, True, False)
    """
    flat = json.loads(json.dumps(_flat(to_dict(cfg))))
    return {k: v for k, v in flat.items()
            if k == "eval.split" or not any(k == c or (c.endswith(".") and k.startswith(c)) for c in RESUMABLE_CHANGES)}


def read_state(path: Path) -> dict[str, Any]:
    """The ``state.json`` of checkpoint ``path``."""
    try:
        return json.loads((path / "state.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError) as e:
        raise SftError(f"{path}: checkpoint is unreadable ({e}); delete it to resume from an older one") from None


def check_resume(path: Path, saved: dict[str, Any], cfg: Config, rt: Runtime) -> None:
    """Refuse to resume from ``path`` (its ``state.json`` is ``saved``) under another world size
    or with data, model or training settings that differ, naming the first differing key."""
    world = rt.world
    if saved.get("world_size", 1) != world:
        raise SftError(f"{path}: the checkpoint was made by {saved.get('world_size', 1)} processes, this run has "
                       f"{world}; resume with the same number (--nproc / --nproc_per_node x --nnodes)")
    before = saved.get("config")
    if before is None:
        return  # a checkpoint from before the config was recorded
    now = resume_config(cfg)
    for key in sorted(set(before) | set(now)):
        if key not in before and key in ADDED_KEYS:
            if now.get(key) != ADDED_KEYS[key]:
                raise SftError(f"{path}: the checkpoint predates {key}; its run behaved as {key}: "
                               f"{ADDED_KEYS[key]!r}, this one has {now.get(key)!r}. Resume with "
                               f"--{key}={ADDED_KEYS[key]} (or start a new run with --overwrite)")
            continue
        if before.get(key) != now.get(key):
            raise SftError(f"{path}: {key} was {before.get(key)!r} when the checkpoint was made, now "
                           f"{now.get(key)!r}; resume with the same value (or start a new run with --overwrite)")


# ---------------------------------------------------------------------------------------------
# save


def _rng_states(rt: Runtime) -> dict[str, torch.Tensor]:
    """Every rank's torch (and CUDA) RNG state, gathered on all ranks: rank 0's as ``torch``/``cudaN``,
    rank r's as ``torch.rankR``/``cudaN.rankR``, so each rank resumes its own random stream."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            mine[f"cuda{i}"] = st
    world, dev = rt.world, rt.device
    if world == 1:
        return mine
    import torch.distributed as dist

    out: dict[str, torch.Tensor] = {}
    for key, st in mine.items():  # fixed-size uint8 tensors: all_gather them
        parts = [torch.empty_like(st, device=dev) for _ in range(world)]
        dist.all_gather(parts, st.to(dev))
        for r, part in enumerate(parts):
            out[key if r == 0 else f"{key}.rank{r}"] = part.cpu()
    return out


def save_checkpoint(
    ckpt_root: Path, step: int, model: Any, optimizer: torch.optim.Optimizer, state: RunState, keep: int,
    rt: Runtime,
) -> Path:
    """Write ``ckpt_root/step-{step}`` atomically and keep only the newest ``keep``.

    Under torchrun every rank calls it (it gathers RNG states, and FSDP2 shards are written by
    their owners); rank 0 alone writes the rest and renames the folder into place.
    """
    target = ckpt_root / f"step-{step}"
    rank, world = rt.rank, rt.world
    rng = _rng_states(rt)
    py_state = random.getstate()
    full = {**state, "step": step, "world_size": world, "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}

    def write_common(d: Path) -> None:
        save_file(rng, str(d / "rng.safetensors"))
        (d / "state.json").write_text(json.dumps(full, indent=1))

    if not is_sharded(model):
        if rank == 0:
            def write(d: Path) -> None:
                save_file(trainable_state(model), str(d / "model.safetensors"))
                opt_tensors, opt_meta = _optimizer_tensors(optimizer)
                save_file(opt_tensors, str(d / "optimizer.safetensors"))
                (d / "optimizer.json").write_text(json.dumps(opt_meta))
                write_common(d)

            ckpt_root.mkdir(parents=True, exist_ok=True)
            atomic_write_dir(target, write)
    else:
        tmp = ckpt_root / f".tmp-{target.name}"
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        rt.barrier()
        _save_sharded(tmp, model, optimizer, rt)
        rt.barrier()
        if rank == 0:
            write_common(tmp)
            fsync_tree(tmp)
            rename_into_place(tmp, target)
    if rank == 0 and keep > 0:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return target


def _sharded_state(model: Any, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """FSDP2: the trainable weights and the (flattened) optimizer state, as DTensor shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    names = {n for n, _ in model.named_parameters()}  # a tied output head appears once
    return {k: v for k, v in model_sd.items() if k in names}, optim_sd


def _save_sharded(d: Path, model: Any, optimizer: torch.optim.Optimizer, rt: Runtime) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model_sd, optim_sd = _sharded_state(model, optimizer)
    tensors = {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)}
    dcp.save(model_sd, storage_writer=HuggingFaceStorageWriter(str(d / "model"), save_distributed=True))
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(d / "optimizer"), save_distributed=True))
    if rt.main:  # the hyperparameters (lr, betas, ...): the same on every rank
        rest = {k: v for k, v in optim_sd.items() if not isinstance(v, torch.Tensor)}
        (d / "optimizer.json").write_text(json.dumps(rest))


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


# ---------------------------------------------------------------------------------------------
# load


def load_checkpoint(path: Path, model: Any, optimizer: torch.optim.Optimizer, rt: Runtime) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states; return the saved ``state.json``.

    Every trainable parameter of ``model`` must be in the checkpoint and every saved weight must
    be a parameter of ``model``: otherwise the config changed since the checkpoint was made.
    """
    try:
        state: dict[str, Any] = json.loads((path / "state.json").read_text())
        if is_sharded(model):
            _load_sharded(path, model, optimizer)
        else:
            weights = load_file(str(path / "model.safetensors"))
            _check_names(path, set(weights), {n for n, p in model.named_parameters() if p.requires_grad},
                         {n for n, _ in model.named_parameters()})
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in weights.items():
                    params[n].copy_(t)
            _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")),
                            json.loads((path / "optimizer.json").read_text()))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError) as e:
        raise SftError(f"{path}: checkpoint is unreadable ({e}); delete it to resume from an older one") from None
    rank = rt.rank
    suffix = "" if rank == 0 else f".rank{rank}"
    torch.set_rng_state(rng.get(f"torch{suffix}", rng["torch"]))
    if torch.cuda.is_available():
        states = [rng.get(f"cuda{i}{suffix}", rng.get(f"cuda{i}")) for i in range(torch.cuda.device_count())]
        if all(s is not None for s in states) and states:
            torch.cuda.set_rng_state_all(states)  # type: ignore[arg-type]
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state


def _check_names(path: Path, saved: set[str], trainable: set[str], known: set[str]) -> None:
    unknown = sorted(saved - known)
    if unknown:
        raise SftError(f"{path}: checkpoint does not match the model ({unknown[0]} unknown); "
                       "was the config changed? Resume with the same model and train.method")
    missing = sorted(trainable - saved)
    if missing:
        raise SftError(f"{path}: trainable parameter {missing[0]} is not in the checkpoint "
                       f"({len(missing)} missing); resume with the same model, train.method and freezing")


def _load_sharded(path: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_sd, optim_sd = _sharded_state(model, optimizer)
    reader = HuggingFaceStorageReader(str(path / "model"))
    saved = set(reader.read_metadata().state_dict_metadata)
    _check_names(path, saved, set(model_sd), set(model_sd))
    dcp.load(model_sd, storage_reader=reader)
    tensors = {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)}
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / "optimizer")))
    rest = json.loads((path / "optimizer.json").read_text())
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict={**rest, **tensors},  # type: ignore[dict-item]
                   options=StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False))


def full_state_dict(model: Any, rt: Runtime) -> dict[str, torch.Tensor]:
    """FSDP2: the whole model's weights gathered on rank 0 (on the CPU); every rank must call it.
    Other ranks get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if rt.main else {}  # type: ignore[return-value]
