"""HF directory -> GGUF with llama.cpp's own converter and quantizer, template and stops included.

Nothing here writes GGUF by hand. ``convert_hf_to_gguf.py`` (with its ``conversion/`` package and
its own ``gguf-py``) comes from the sdist of the pinned ``llama-cpp-python`` and is extracted into
the venv by ``make install-export``; it runs in a subprocess with its own ``gguf-py`` first on
PYTHONPATH, so it never mixes with the installed ``gguf`` that transformers reads GGUF with.
q4_k_m is made from the f16 file by llama.cpp's quantizer (``llama_model_quantize`` in the
bindings). Before converting, the tokenizer files are staged so that EOS is the end-of-turn token
and the chat template is the training template; afterwards the metadata is read back and checked,
so a converter change that loses either is an error, not a model that rambles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from sft.errors import SftError

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned export extra; its sdist carries the converter we extract
QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
_LLAMA_FTYPE = {"q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q4_K_M in llama.h

# The architectures sft trains and llama.cpp's converter supports (registered in its conversion/).
ARCHITECTURES = {
    "LlamaForCausalLM": "Llama / SmolLM2",
    "MistralForCausalLM": "Mistral",
    "Qwen2ForCausalLM": "Qwen2",
    "Qwen3ForCausalLM": "Qwen3",
    "Gemma3ForCausalLM": "Gemma 3",
    "Gemma2ForCausalLM": "Gemma 2",
    "GemmaForCausalLM": "Gemma",
    "Phi3ForCausalLM": "Phi-3",
}

_INSTALL = "run `make install-export` (the pinned `pip install -e .[export]` plus llama.cpp's converter)"

# The quantizer in a child process: its per-tensor log goes through the same filter as the converter's.
_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


# The converter, run as is, plus one key: tokenizer.ggml.eot_token_id = the end-of-turn token when the
# converter set none (without it llama.cpp guesses EOT from token texts: SmolLM2's <|endoftext|>).
_CONVERT = """
import runpy, sys
import gguf
script, eot = sys.argv[1], int(sys.argv.pop(2))
_header = gguf.GGUFWriter.write_header_to_file
def write_header_to_file(self, *args, **kwargs):
    if not any(gguf.Keys.Tokenizer.EOT_ID in kv for kv in self.kv_data):
        self.add_eot_token_id(eot)
    return _header(self, *args, **kwargs)
gguf.GGUFWriter.write_header_to_file = write_header_to_file
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def converter_dir() -> Path:
    """The extracted llama.cpp converter: ``$SFT_LLAMA_CPP`` or ``<venv>/share/sft/llama.cpp``."""
    env = os.environ.get("SFT_LLAMA_CPP")
    d = Path(env) if env else Path(sys.prefix) / "share" / "sft" / "llama.cpp"
    if not (d / "convert_hf_to_gguf.py").is_file() or not (d / "gguf-py" / "gguf").is_dir():
        raise SftError(f"--to gguf: llama.cpp's converter is not installed ({d} has no convert_hf_to_gguf.py); {_INSTALL}")
    return d


def has_quantizer() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_architecture(hf_dir: Path) -> str:
    """The model's architecture if we export it, else an error that names the ones we do."""
    try:
        cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SftError(f"{hf_dir / 'config.json'}: cannot read it ({e}); export a model directory such as runs/x/final") from None
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return str(a)
    names = ", ".join(f"{v} ({k})" for k, v in ARCHITECTURES.items())
    raise SftError(
        f"{hf_dir / 'config.json'}: architecture {', '.join(archs) or '(none)'} is not one sft exports to GGUF; "
        f"supported: {names}. Export --to hf and convert it with llama.cpp yourself if llama.cpp supports it"
    )


def stage(hf_dir: Path, staged: Path, template: str, eot_token: str) -> Path:
    """A converter input: links to the weights, copies of the small files with EOS = ``eot_token``
    and the chat template = ``template`` (the converter reads both from these files)."""
    staged.mkdir(parents=True, exist_ok=True)
    for f in hf_dir.iterdir():
        if f.suffix == ".safetensors":
            (staged / f.name).symlink_to(f.resolve())
        elif f.is_file() and f.suffix in (".json", ".jinja", ".model", ".txt"):
            shutil.copy2(f, staged / f.name)
    tc_path = staged / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    tc["eos_token"] = eot_token
    tc.pop("chat_template", None)  # one source of truth: chat_template.jinja below
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
    (staged / "chat_template.jinja").write_text(template, encoding="utf-8")
    (staged / "chat_template.json").unlink(missing_ok=True)
    return staged


# ---------------------------------------------------------------------------------------------
# child processes, with their logs reduced to a progress line


_TENSOR_RE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")  # llama.cpp quantizer: "[  12/ 272]  blk.1.attn_q.weight ..."


def _run(cmd: list[str], env: dict[str, str], what: str, log_path: Path) -> None:
    """Run ``cmd``; show its progress bars (tqdm ``...%|``) and tensor counters on stderr, keep the
    rest for the error message."""
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    buf = ""
    while True:
        chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
        if not chunk:
            break
        buf += chunk.decode("utf-8", "replace")
        *done, buf = re.split(r"[\r\n]", buf)
        for line in done:
            if not line.strip():
                continue
            tail.append(line)
            m = _TENSOR_RE.search(line)
            if "%|" in line:
                print(f"\r  {what}: {line.strip()[:100]:<100}", end="", file=sys.stderr, flush=True)
            elif m:
                print(f"\r  {what}: tensor {m.group(1)}/{m.group(2)}    ", end="", file=sys.stderr, flush=True)
    rc = proc.wait()
    print(file=sys.stderr, flush=True)
    if rc != 0:
        log_path.write_text("\n".join(tail) + "\n", encoding="utf-8")
        errors = [x for x in tail if "rror" in x] or list(tail)[-1:]
        raise SftError(f"{what} failed (exit {rc}): {errors[-1].strip() if errors else 'no output'}; full log: {log_path}")


def convert(staged: Path, out: Path, outtype: str, eot_id: int) -> None:
    """``convert_hf_to_gguf.py staged --outtype outtype --outfile out`` with its own gguf-py."""
    conv = converter_dir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), str(conv)])
    env["NO_LOCAL_GGUF"] = ""  # the converter's own gguf-py, which PYTHONPATH puts first
    cmd = [sys.executable, "-c", _CONVERT, str(conv / "convert_hf_to_gguf.py"), str(eot_id), str(staged), "--outtype", outtype,
           "--outfile", str(out), "--model-name", out.stem]
    _run(cmd, env, f"llama.cpp convert ({outtype})", out.with_suffix(".log"))


def quantize(src: Path, out: Path, quant: str) -> None:
    """llama.cpp's quantizer (the bindings' ``llama_model_quantize``), ``src`` f16 -> ``out``."""
    if not has_quantizer():
        raise SftError(f"--quant {quant}: llama.cpp's quantizer (llama-cpp-python) is not installed; {_INSTALL}")
    cmd = [sys.executable, "-c", _QUANTIZE, str(src), str(out), str(_LLAMA_FTYPE[quant])]
    _run(cmd, dict(os.environ), f"llama.cpp quantize ({quant})", out.with_suffix(".log"))


# ---------------------------------------------------------------------------------------------
# metadata


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's key/value metadata (arrays of tokens excepted), read with the installed ``gguf``."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            out[name] = f.contents()
        except Exception:  # exotic types: not needed here
            continue
    return out


def check_metadata(path: Path, template: str, eot_id: int) -> dict[str, Any]:
    """Fail if the GGUF lost the training template or its EOS/EOT is not the end-of-turn token."""
    meta = read_metadata(path)
    if meta.get("tokenizer.chat_template") != template:
        raise SftError(f"{path}: tokenizer.chat_template is not the training template after conversion "
                       f"(llama-cpp-python {LLAMA_CPP_PYTHON}'s converter changed?); report this with the file")
    if meta.get("tokenizer.ggml.eos_token_id") != eot_id:
        raise SftError(f"{path}: tokenizer.ggml.eos_token_id is {meta.get('tokenizer.ggml.eos_token_id')}, "
                       f"not the end-of-turn token {eot_id}; report this with the file")
    if meta.get("tokenizer.ggml.eot_token_id") != eot_id:
        raise SftError(f"{path}: tokenizer.ggml.eot_token_id is {meta.get('tokenizer.ggml.eot_token_id')}, "
                       f"not the end-of-turn token {eot_id}; report this with the file")
    return meta


def write_gguf(hf_dir: Path, out: Path, quant: str, template: str, eot_token: str, eot_id: int, work: Path) -> dict[str, Any]:
    """Convert ``hf_dir`` to ``out`` in ``quant``; return the checked metadata."""
    if quant not in QUANTS:
        raise SftError(f"--quant: {quant!r} is not supported; use one of {', '.join(QUANTS)}")
    check_architecture(hf_dir)
    staged = stage(hf_dir, work / "staged", template, eot_token)
    written = work / out.name  # ``work`` is beside ``out``: a finished file is renamed into place
    if quant in _LLAMA_FTYPE:
        f16 = work / "model-f16.gguf"
        convert(staged, f16, "f16", eot_id)
        quantize(f16, written, quant)
        f16.unlink()
    else:
        convert(staged, written, quant, eot_id)
    meta = check_metadata(written, template, eot_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    written.replace(out)
    return meta
