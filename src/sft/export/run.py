"""``sft export RUN_DIR_OR_MODEL --to gguf|ollama|hf|adapter``: the tuned model where people run it.

- ``gguf``: one file for llama.cpp / LM Studio (f16, bf16, q8_0 or q4_k_m) made by llama.cpp's own
  converter and quantizer (``sft.export.gguf``), carrying the training chat template, EOS = end of turn;
- ``ollama``: that GGUF plus a ``Modelfile`` (``sft.export.ollama``) and the ``ollama create`` command;
- ``hf``: a merged, sharded safetensors directory with tokenizer, template and generation config;
- ``adapter``: the PEFT adapter of a LoRA run, alone.

A LoRA run is exported by merging ``adapter/`` into its base model afresh (in fp32, then cast), so
an adapter is enough; the result matches the run's ``final/``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sft.errors import SftError
from sft.export.gguf import QUANTS, check_architecture, write_gguf

TARGETS = ("gguf", "ollama", "hf", "adapter")
DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_QUANT = "q8_0"  # near-lossless at half the size of f16 (bench/export_agreement.py)
SHARD_SIZE = "2GB"


@dataclass
class Source:
    """What ``RUN_DIR_OR_MODEL`` holds."""

    name: str  # stem of the default output names
    root: Path  # default outputs go here
    model_dir: Path | None = None  # an HF directory with weights (a run's final/, or a model)
    adapter_dir: Path | None = None  # a PEFT adapter (a LoRA run's adapter/)
    bases: list[str] = field(default_factory=list)  # candidates for the adapter's base model
    revision: str | None = None
    system: str | None = None  # the run's data.system: the default system prompt of its data
    merge: bool = True  # False for a QLoRA run: its final/ (dequantized 4-bit base + adapter) is the model

    @property
    def tokenizer_dir(self) -> Path:
        d = self.model_dir or self.adapter_dir
        assert d is not None
        return d


@dataclass
class ExportResult:
    path: Path
    bytes: int
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)
    command: str | None = None  # what to run next (ollama create ...)


def find_source(arg: str) -> Source:
    """A run directory, an adapter directory, an HF model directory, or any ``model:`` value."""
    p = Path(arg).expanduser()
    if p.is_dir() and (p / "config.yaml").is_file() and ((p / "final").is_dir() or (p / "adapter").is_dir()):
        try:
            cfg = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise SftError(f"{p / 'config.yaml'}: not valid YAML ({e}); is this a run directory?") from None
        adapter = p / "adapter" if (p / "adapter" / "adapter_config.json").is_file() else None
        src = Source(p.resolve().name, p / "export", p / "final" if (p / "final").is_dir() else None, adapter,
                     revision=cfg.get("revision"), system=(cfg.get("data") or {}).get("system"))
        if adapter is not None:
            src.bases = [str(cfg.get("model", "")), *_adapter_base(adapter)]
            # QLoRA trained against the 4-bit base: merging into the original weights would give another model
            src.merge = not ((cfg.get("train") or {}).get("method") == "qlora" and src.model_dir is not None)
        return src
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return Source(p.resolve().name, Path.cwd(), None, p, bases=_adapter_base(p))
    if p.is_dir() and (p / "config.json").is_file():
        return Source(p.resolve().name, Path.cwd(), p)
    from sft.models.load import model_dir, resolve

    model = resolve(arg)  # an alias, a .gguf file or a hub ID; fails with what to write instead
    return Source(Path(model.name).stem.replace("/", "-"), Path.cwd(), model_dir(model))


def _adapter_base(adapter: Path) -> list[str]:
    try:
        base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError):
        return []
    return [str(base)] if base else []


def _merged(src: Source) -> Any:
    """The adapter merged into its base model, in fp32."""
    import torch

    from sft.models.load import load_model, quiet_peft
    from sft.models.quantize import quiet_bitsandbytes

    with quiet_peft(), quiet_bitsandbytes():
        from peft import PeftModel

    errors = []
    for base in dict.fromkeys(b for b in src.bases if b):
        try:
            model = load_model(base, torch.float32, revision=src.revision)
            break
        except SftError as e:
            errors.append(str(e))
    else:
        raise SftError(f"{src.adapter_dir}: cannot load the adapter's base model ({'; '.join(errors) or 'none named'}); "
                       "export from the directory the run was trained in, or export its final/ instead")
    print(f"  merging {src.adapter_dir} into {base} ...", file=sys.stderr, flush=True)
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(src.adapter_dir)).merge_and_unload().eval()


def _tokenizer(src: Source) -> tuple[Any, str, list[int], int]:
    """The tokenizer with the training template, the end-of-turn ids (first = the turn's own) and pad."""
    from sft.models.load import load_tokenizer
    from sft.models.save import finalize_tokenizer

    tok = load_tokenizer(str(src.tokenizer_dir))
    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise SftError(f"{src.tokenizer_dir}: no chat template to export; export a run's final/ (it carries the "
                       "training template) or a chat model")
    tok, stops, pad = finalize_tokenizer(tok, str(template))
    return tok, str(template), stops, pad


def _dtype_of(d: Path | None) -> str:
    from sft.models.save import _HF_DTYPES

    try:
        hf = json.loads((d / "config.json").read_text(encoding="utf-8")) if d else {}
    except (OSError, ValueError):
        hf = {}
    return _HF_DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype")), "fp32")


def write_hf(src: Source, out: Path, dtype: str | None) -> Path:
    """A merged, sharded safetensors directory (tokenizer, template, generation config) at ``out``."""
    import torch

    from sft.models.load import load_model
    from sft.models.save import SAVE_DTYPES, attach_generation_config

    tok, _, stops, pad = _tokenizer(src)
    if src.adapter_dir is not None and src.merge:
        model = _merged(src)
        dtype = dtype or (_dtype_of(src.model_dir) if src.model_dir else "fp32")
    else:
        assert src.model_dir is not None
        check_safetensors(src.model_dir)
        model = load_model(str(src.model_dir), torch.float32)
        dtype = dtype or _dtype_of(src.model_dir)
    attach_generation_config(model, tok, stops, pad)
    model = model.to(SAVE_DTYPES[dtype])
    print(f"  writing {dtype} safetensors (shards of at most {SHARD_SIZE}) ...", file=sys.stderr, flush=True)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=SHARD_SIZE)
    tok.save_pretrained(str(out))
    return out


def check_safetensors(d: Path) -> None:
    if not any(d.glob("*.safetensors")):
        raise SftError(f"{d}: no .safetensors weights; sft never loads pickled (.bin) weights")


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(n: float) -> str:
    """
    >>> human(81_234_567)
    '81.2 MB'
    """
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _default_out(src: Source, to: str, quant: str, dtype: str | None) -> Path:
    if to == "gguf":
        return src.root / f"{src.name}-{quant}.gguf"
    if to == "ollama":
        return src.root / f"{src.name}-ollama"
    if to == "hf":
        return src.root / (f"{src.name}-hf" + (f"-{dtype}" if dtype else ""))
    return src.root / f"{src.name}-adapter"


def _gguf(src: Source, out: Path, quant: str, work: Path) -> dict[str, Any]:
    tok, template, stops, _ = _tokenizer(src)
    hf_dir = src.model_dir
    if src.model_dir is not None:
        check_architecture(src.model_dir)  # refuse before any slow merge
    if src.adapter_dir is not None and src.merge:  # merge afresh, written as final/ is (its dtype), then convert
        hf_dir = write_hf(src, work / "merged", None)
    assert hf_dir is not None
    check_safetensors(hf_dir)
    return write_gguf(hf_dir, out, quant, template, tok.convert_ids_to_tokens(stops[0]), stops[0], work)


def export(arg: str, to: str, quant: str | None = None, dtype: str | None = None, out: str | None = None) -> ExportResult:
    """Export ``arg`` to ``to``; print progress, size and time; return where it went."""
    if to not in TARGETS:
        raise SftError(f"--to: {to!r} is not a target; use one of {', '.join(TARGETS)}")
    if quant is not None and to not in ("gguf", "ollama"):
        raise SftError(f"--quant applies to --to gguf and --to ollama; for --to {to} use --dtype")
    if dtype is not None and to != "hf":
        raise SftError(f"--dtype applies to --to hf; for --to {to} use --quant" if to != "adapter" else
                       "--dtype applies to --to hf; an adapter is written as trained")
    if dtype is not None and dtype not in DTYPES:
        raise SftError(f"--dtype: {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    quant = quant or DEFAULT_QUANT
    if quant not in QUANTS:
        raise SftError(f"--quant: {quant!r} is not supported; use one of {', '.join(QUANTS)}")
    src = find_source(arg)
    target = Path(out) if out else _default_out(src, to, quant, dtype)
    if target.exists():
        raise SftError(f"{target} already exists; delete it or pass another --out")
    if to == "adapter" and src.adapter_dir is None:
        raise SftError(f"{arg}: no adapter/ here (a full fine-tuning run has none); use --to hf or --to gguf")
    start = time.perf_counter()
    print(f"Exporting {arg} -> {target} ({to}{', ' + quant if to in ('gguf', 'ollama') else ''})", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    result = ExportResult(target, 0, 0.0)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        work = Path(tmp)
        if to == "adapter":
            assert src.adapter_dir is not None
            shutil.copytree(src.adapter_dir, work / "adapter")
            (work / "adapter").rename(target)
        elif to == "hf":
            write_hf(src, work / "hf", dtype).rename(target)
        elif to == "gguf":
            result.metadata = _gguf(src, target, quant, work)
        else:
            result = _ollama(src, target, quant, work)
    result.seconds = time.perf_counter() - start
    result.bytes = _size(target)
    print(f"Wrote {target} ({human(result.bytes)}) in {result.seconds:.1f} s", flush=True)
    if result.command:
        print(f"Run it with Ollama:\n  {result.command}", flush=True)
    return result


def _ollama(src: Source, target: Path, quant: str, work: Path) -> ExportResult:
    from sft.export.ollama import modelfile

    tok, template, stops, _ = _tokenizer(src)
    gguf_name = f"{src.name}-{quant}.gguf"
    text, family = modelfile(gguf_name, template, tok, tok.convert_ids_to_tokens(stops), src.system)  # fails early
    staging = work / "ollama"
    staging.mkdir()
    meta = _gguf(src, staging / gguf_name, quant, work)
    (staging / "Modelfile").write_text(text, encoding="utf-8")
    staging.rename(target)
    print(f"  Modelfile: template translated from {family.name}{' with tools' if family.tools else ''}, "
          f"stops {', '.join(tok.convert_ids_to_tokens(stops))}",
          file=sys.stderr, flush=True)
    return ExportResult(target, 0, 0.0, meta, command=f"ollama create {src.name} -f {target / 'Modelfile'}")


def run_export(arg: str, to: str, quant: str | None, dtype: str | None, out: str | None) -> int:
    """The CLI entry: ``sft export``."""
    export(arg, to, quant, dtype, out)
    return 0
