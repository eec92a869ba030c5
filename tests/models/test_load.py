"""Hub IDs load from a real HF cache layout, offline, through the code path a networked user takes.

No test reaches a hub. ``hub_cache_repo`` writes what ``huggingface_hub.snapshot_download`` leaves
behind (``models--org--name/{blobs,refs,snapshots/<commit>}``, snapshot files symlinked to blobs
named by their git or LFS hash; see huggingface_hub's ``file_download.py``), and
``huggingface_hub.scan_cache_dir`` is asked to read it back, so the layout is the library's own.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest

from sft.errors import SftError

COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"  # 40 hex digits
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"


def _blob_name(name: str, data: bytes) -> str:
    """The hub names an LFS blob (weights) by its sha256 and a git blob by its git sha1."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache_repo(cache: Path, repo_id: str, files_dir: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of ``files_dir`` into ``cache`` as snapshot ``commit`` of model ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in files_dir.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / _blob_name(f.name, data)
        blob.write_bytes(data)
        link = snap / f.relative_to(files_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: Any, smol_tok: Any) -> dict[str, Path]:
    """Two tiny random Llamas (seeds 0 and 1) with SmolLM2's real tokenizer, saved as HF dirs."""
    from conftest import tiny_llama

    out = {}
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"seed{seed}")
        tiny_llama(len(smol_tok), seed=seed).save_pretrained(str(d), safe_serialization=True)
        smol_tok.save_pretrained(str(d))
        (d / "pytorch_model.bin").write_bytes(b"not a pickle: must never be read")
        out[f"seed{seed}"] = d
    return out


@pytest.fixture()
def hf_home(tmp_path: Path, monkeypatch: Any, model_files: dict[str, Path]) -> Path:
    """$HF_HOME with org/tiny-llama: main -> commit A (seed 0), tag v1 -> commit B (seed 1); offline."""
    home = tmp_path / "hf"
    cache = home / "hub"
    hub_cache_repo(cache, "org/tiny-llama", model_files["seed0"], COMMIT_A)
    hub_cache_repo(cache, "org/tiny-llama", model_files["seed1"], COMMIT_B, refs=("v1",))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "org/tiny-llama" is not a path here
    return home


def _weights(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_layout_is_huggingface_hubs_own(hf_home: Path) -> None:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_home / "hub")
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == ("org/tiny-llama", "model")
    revs = {r.commit_hash: r for r in repo.revisions}
    assert set(revs) == {COMMIT_A, COMMIT_B}
    assert revs[COMMIT_A].refs == frozenset({"main"}) and revs[COMMIT_B].refs == frozenset({"v1"})
    assert "model.safetensors" in {f.file_name for f in revs[COMMIT_A].files}


def test_hub_id_loads_from_the_cache_offline(hf_home: Path, model_files: dict[str, Path], smol_tok: Any) -> None:
    from transformers import AutoModelForCausalLM

    from sft.models.load import load_model, load_tokenizer, model_dir, resolve

    src = resolve("org/tiny-llama")
    assert src.kind == "hf" and src.repo_id == "org/tiny-llama"
    assert src.path == hf_home / "hub" / "models--org--tiny-llama" / "snapshots" / COMMIT_A
    assert model_dir(src) == src.path

    model = load_model("org/tiny-llama")
    expected = AutoModelForCausalLM.from_pretrained(str(model_files["seed0"]), use_safetensors=True)
    other = AutoModelForCausalLM.from_pretrained(str(model_files["seed1"]), use_safetensors=True)
    assert _same(_weights(model), _weights(expected))
    assert not _same(_weights(model), _weights(other))  # control: the two snapshots differ

    tok = load_tokenizer("org/tiny-llama")
    text = "Héllo, wörld! 12 + 30 = 42"
    assert tok(text)["input_ids"] == smol_tok(text)["input_ids"]
    assert tok.chat_template == smol_tok.chat_template


@pytest.mark.parametrize("revision", ["v1", COMMIT_B])
def test_revision_picks_the_snapshot(hf_home: Path, model_files: dict[str, Path], revision: str) -> None:
    from transformers import AutoModelForCausalLM

    from sft.models.load import load_model, resolve

    assert resolve("org/tiny-llama", revision).path.name == COMMIT_B
    model = load_model("org/tiny-llama", revision=revision)
    seed1 = AutoModelForCausalLM.from_pretrained(str(model_files["seed1"]), use_safetensors=True)
    assert _same(_weights(model), _weights(seed1))


def test_only_safetensors_config_and_tokenizer_are_wanted() -> None:
    from huggingface_hub.utils import filter_repo_objects

    from sft.models.load import _CONFIG_FILES, _IGNORE, _WEIGHTS

    repo = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "merges.txt", "tokenizer.model",
            "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "training_args.bin", "consolidated.safetensors", "original/model.pth",
            "model.gguf", "flax_model.msgpack", "optimizer.pt", "modeling_x.py", "README.md"]
    got = set(filter_repo_objects(repo, allow_patterns=_CONFIG_FILES + _WEIGHTS, ignore_patterns=_IGNORE))
    assert got == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "merges.txt", "tokenizer.model",
                   "model-00001-of-00002.safetensors", "model.safetensors.index.json"}
    tokenizer_only = set(filter_repo_objects(repo, allow_patterns=_CONFIG_FILES, ignore_patterns=_IGNORE))
    assert not any(f.endswith(".safetensors") for f in tokenizer_only)


def test_unreachable_hub_falls_back_to_the_cache(hf_home: Path, monkeypatch: Any, model_files: dict[str, Path]) -> None:
    """Online mode (HF_HUB_OFFLINE unset) with a hub that refuses connections: the cache is used."""
    import huggingface_hub.constants as hc

    from sft.models.load import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    from transformers import AutoModelForCausalLM

    model = load_model("org/tiny-llama")
    seed0 = AutoModelForCausalLM.from_pretrained(str(model_files["seed0"]), use_safetensors=True)
    assert _same(_weights(model), _weights(seed0))


def test_missing_model_says_where_it_looked_and_how_to_fix(hf_home: Path) -> None:
    from sft.models.load import load_model

    with pytest.raises(SftError) as e:
        load_model("org/not-there")
    msg = str(e.value)
    assert "\n" not in msg
    assert str(hf_home / "hub" / "models--org--not-there") in msg  # the HF cache
    assert "HF_HUB_OFFLINE is set" in msg  # why the hub was not asked
    assert str(Path("org/not-there").resolve()) in msg  # the disk
    assert "hf auth login" in msg and "check the ID" in msg


def test_missing_revision_offline(hf_home: Path) -> None:
    from sft.models.load import load_tokenizer

    with pytest.raises(SftError, match=r"'org/tiny-llama' at revision 'v9' is not in the HF cache"):
        load_tokenizer("org/tiny-llama", revision="v9")


def test_missing_model_with_the_hub_unreachable(hf_home: Path, monkeypatch: Any) -> None:
    import huggingface_hub.constants as hc

    from sft.models.load import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(SftError, match=r"the hub could not be reached \(ConnectError\)"):
        load_model("org/not-there")


def test_cached_snapshot_without_safetensors(hf_home: Path, model_files: dict[str, Path], tmp_path: Path) -> None:
    """A repository with pickled weights only: the .bin is never downloaded nor read."""
    from sft.models.load import load_model

    d = tmp_path / "bin-only"
    d.mkdir()
    for f in model_files["seed0"].iterdir():
        if not f.name.endswith(".safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
    hub_cache_repo(hf_home / "hub", "org/bin-only", d, COMMIT_A)
    with pytest.raises(SftError, match=r"org/bin-only .* has no \.safetensors weights; sft fetches only safetensors, never pickled"):
        load_model("org/bin-only")


def test_typo_in_a_local_path_names_both_places(tmp_path: Path, monkeypatch: Any) -> None:
    from sft.models.load import resolve

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SftError, match=r"not a packaged alias.*not found: .*runs/x/finall.*Hub ID such as"):
        resolve("runs/x/finall")


def test_a_run_directory_given_as_a_model_points_at_its_final(tmp_path: Path) -> None:
    """`sft chat runs/x` (sft export and compare take a run directory): the error names the run's
    final/ (it said only "a directory without config.json")."""
    from sft.models.load import resolve

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("model: x\n")
    with pytest.raises(SftError, match=re.escape(f"model: {run} is a run directory; give its model, {run / 'final'}")):
        resolve(str(run))
    with pytest.raises(SftError, match=r"is a directory without config\.json; point at an HF model directory$"):
        resolve(str(tmp_path))  # control: a plain folder


def test_cli_does_not_force_offline(monkeypatch: Any, tmp_path: Path) -> None:
    from sft.cli import main

    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["data", "check", str(tmp_path / "missing.yaml")]) == 1
    assert "HF_HUB_OFFLINE" not in os.environ


def test_tokenizer_alone_is_fetched_until_weights_are_needed(hf_home: Path, monkeypatch: Any) -> None:
    """``sft data`` (load_tokenizer) never asks for weights; load_model does, and never for pickles."""
    import huggingface_hub

    from sft.models.load import load_model, load_tokenizer

    calls: list[dict[str, Any]] = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id: str, **kw: Any) -> Any:
        calls.append(kw)
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    load_tokenizer("org/tiny-llama")
    assert len(calls) == 1 and "*.safetensors" not in calls[0]["allow_patterns"]
    load_model("org/tiny-llama")
    assert "*.safetensors" in calls[-1]["allow_patterns"] and "*.bin" in calls[-1]["ignore_patterns"]
    assert all(c["local_files_only"] and c["cache_dir"] == hf_home / "hub" for c in calls)
