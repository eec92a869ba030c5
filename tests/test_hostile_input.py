"""Hostile and sloppy input (issue 15): every case ends in success or one clear line with exit 1,
never a traceback, never silent success on unusable data, and a finished run is never lost.

Most cases go through ``sft.cli.main`` in-process (fast); the --overwrite case and a kill during a
save run the real CLI / a real process.
"""

from __future__ import annotations

import codecs
import errno
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_ROWS
from sft.cli import main
from sft.errors import SftError

SFT = str(Path(sys.executable).with_name("sft"))
ROW = TINY_ROWS[0]
LINE = json.dumps(ROW)


def write_cfg(tmp: Path, model: Path, train: str) -> Path:
    lines = [f"model: {model}", f"output_dir: {tmp / 'run'}", "data:", f"  train: {json.dumps(train)}",
             "  max_length: 128", f"  cache_dir: {tmp / 'cache'}",
             "train:", "  max_steps: 2", "  batch_size: 2", "  precision: fp32", "  lr: 1.0e-3"]
    p = tmp / "cfg.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """The CLI's error: one line starting with 'error:' (problem lists may follow it), no traceback."""
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture()
def check(tmp_path, tiny_dir, smol_tok, capsys, monkeypatch):
    """``sft data check`` on a data file with the given bytes; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    # the tokenizer of tiny_dir, loaded once (loading it per call costs ~1 s here)
    monkeypatch.setattr("sft.models.load.load_tokenizer", lambda *a, **kw: smol_tok)

    def run(name: str, data: bytes, *extra: str) -> tuple[int, str, str]:
        f = tmp_path / name
        f.write_bytes(data)
        cfg = write_cfg(tmp_path, tiny_dir, str(f))
        return run_main(capsys, "data", "check", str(cfg), *extra)

    return run


# ---------------------------------------------------------------------------------------------
# encodings and line endings


@pytest.mark.parametrize("name,data", [
    ("bom.jsonl", codecs.BOM_UTF8 + (LINE + "\n").encode() * 2),
    ("crlf.jsonl", (LINE + "\r\n").encode() * 2),
    ("bom_crlf.json", codecs.BOM_UTF8 + ("[" + LINE + ",\r\n" + LINE + "]\r\n").encode()),
    ("bom_crlf.csv", codecs.BOM_UTF8 + b"instruction,output\r\nSay hi,Hi!\r\n\"Two\r\nlines\",ok\r\n"),
])
def test_utf8_with_bom_and_crlf_are_read(check, name, data):
    rc, out, err = check(name, data)
    assert rc == 0, out + err
    assert "problems" not in out and "error" not in err


@pytest.mark.parametrize("enc,name", [("utf-16", "UTF-16LE"), ("utf-16-be", "UTF-16BE"), ("utf-16-le", "UTF-16LE"),
                                      ("utf-32", "UTF-32LE")])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf16_and_utf32_are_rejected_naming_the_encoding(check, enc, name, suffix):
    text = {"jsonl": LINE + "\n", "json": f"[{LINE}]", "csv": "instruction,output\nSay hi,Hi!\n"}[suffix[1:]]
    rc, _, err = check("wide" + suffix, text.encode(enc))
    line = one_error_line(err)
    assert rc == 1 and f"wide{suffix}: the file is {name} text, not UTF-8" in line and "iconv" in line


def test_gzip_is_named(check):
    rc, _, err = check("z.jsonl", gzip.compress(LINE.encode()))
    assert rc == 1 and "gzip-compressed" in one_error_line(err)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_invalid_utf8_reports_file_line_and_byte_offset(check, suffix):
    bad = json.dumps({"messages": [{"role": "user", "content": "caf\udce9"},
                                   {"role": "assistant", "content": "ok"}]}, ensure_ascii=False)
    if suffix == ".jsonl":
        data = (LINE + "\n").encode() + bad.encode("utf-8", "surrogateescape") + b"\n"
    elif suffix == ".json":
        data = ("[" + LINE + ",\n").encode() + bad.encode("utf-8", "surrogateescape") + b"]"
    else:
        data = b"instruction,output\nSay hi,Hi!\nCaf\xe9,ok\n"
    rc, out, _ = check("bad" + suffix, data)
    offset = data.index(b"\xe9")
    assert rc == 1
    assert f"bad{suffix}:{2 if suffix != '.csv' else 3}: contains bytes that are not UTF-8 (0xe9 at byte {offset} " \
           "of the file); re-save the file as UTF-8" in out


def test_a_character_split_between_chunks_is_not_a_bad_byte(tmp_path, monkeypatch):
    """read_json decodes 1 MiB chunks; a chunk edge inside a multi-byte character must not matter."""
    from sft.data import sources

    p = tmp_path / "d.json"
    rows = [{"text": "é" * 7 + "€" * 5} for _ in range(40)]
    p.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    for chunk in (7, 8, 9, 16):
        monkeypatch.setattr(sources, "CHUNK", chunk)
        got = list(sources.read_json(p))
        assert [r.error for r in got] == [None] * 40 and [r.value for r in got] == rows


def test_lone_surrogate_escape_is_a_row_error_not_a_tokenizer_crash(check):
    data = (LINE + "\n" + '{"messages": [{"role": "user", "content": "x\\ud800"}, '
            '{"role": "assistant", "content": "ok"}]}\n').encode()
    rc, out, err = check("sur.jsonl", data)
    assert rc == 1 and "sur.jsonl:2: holds a lone surrogate escape \\ud800" in out and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# nesting, empty files


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_deeply_nested_json_is_a_row_error(check, suffix):
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    data = (LINE + "\n" + deep + "\n") if suffix == ".jsonl" else f"[{LINE},\n{deep}]"
    rc, out, err = check("deep" + suffix, data.encode())
    assert rc == 1 and f"deep{suffix}:2: nested too deeply to read" in out and "RecursionError" not in err


@pytest.mark.parametrize("name,data,says", [
    ("empty.jsonl", b"", "the file is empty (or only blank lines)"),
    ("blank.jsonl", b"\n  \r\n\t\n", "the file is empty (or only blank lines)"),
    ("empty.json", b"  \n", "the file is empty"),
    ("array.json", b"[ ]", "the JSON array is empty"),
    ("empty.csv", b"", "the file is empty; write a header line"),
    ("header.csv", b"instruction,output\r\n", "the file has a header but no rows"),
])
def test_empty_files_are_an_error_not_no_examples(check, name, data, says):
    rc, out, err = check(name, data)
    assert rc == 1 and f"{name}:" in out and says in out
    assert "no usable training examples" in one_error_line(err)
    rc, out, err = check(name, data, "--data.on_invalid=skip")  # skipping the problem leaves nothing
    assert rc == 1 and "no usable training examples" in one_error_line(err)


def test_empty_parquet_is_an_error(check, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    rc, out, _ = check("e.parquet", (tmp_path / "e.parquet").read_bytes())
    assert rc == 1 and "e.parquet:1: the Parquet file has no rows" in out


def test_control_a_good_file_passes(check):
    rc, _, err = check("good.jsonl", (LINE + "\n").encode())
    assert rc == 0 and "error" not in err


# ---------------------------------------------------------------------------------------------
# config values


def test_empty_data_train_is_an_error_not_the_working_directory(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # what "" used to read
    (tmp_path / "rows.jsonl").write_text(LINE + "\n")
    cfg = write_cfg(tmp_path, tiny_dir, "")
    rc, _, err = run_main(capsys, "data", "check", str(cfg))
    assert rc == 1 and "data.train[0].path: is empty" in one_error_line(err)
    rc, _, err = run_main(capsys, "data", "check", str(cfg), "--data.train=")
    assert rc == 1 and "data.train[0].path: is empty" in one_error_line(err)
    rc, _, err = run_main(capsys, "data", "check", str(cfg), "--data.train=rows.jsonl")  # control
    assert rc == 0, err


@pytest.mark.parametrize("yaml_text,key", [
    ("output_dir:\n", "output_dir: has no value"),
    ("output_dir: ''\n", "output_dir: is empty"),
    ("model: ''\n", "model: is empty"),
    ("data:\n  train:\n", "data.train: has no value"),
    ("data:\n  train: ['', x.jsonl]\n", "data.train[0].path: is empty"),
    ("train:\n  lr:\n", "train.lr: has no value"),
    ("data:\n", "data: has no value"),
])
def test_blank_config_values_are_named(tmp_path, capsys, yaml_text, key):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    rc, _, err = run_main(capsys, "data", "check", str(p))
    assert rc == 1 and key in one_error_line(err)


def test_config_file_that_is_not_utf8_or_too_deep(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"model: caf\xe9\n")
    rc, _, err = run_main(capsys, "data", "check", str(p))
    assert rc == 1 and "c.yaml" in one_error_line(err)
    p.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    rc, _, err = run_main(capsys, "data", "check", str(p))
    assert rc == 1 and "c.yaml" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# paths that cannot be written


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_output_dir_under_proc_fails_before_any_work(tmp_path, tiny_dir, data_file, capsys, monkeypatch):
    import sft.models.load

    def boom(*a, **kw):
        raise AssertionError("the tokenizer or model was loaded")

    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    monkeypatch.setattr(sft.models.load, "load_tokenizer", boom)  # no data and no model before the check
    monkeypatch.setattr(sft.models.load, "load_model", boom)
    rc, out, err = run_main(capsys, "train", str(cfg), "--output_dir=/proc/sft-test/run")
    assert rc == 1
    assert "/proc/sft-test/run: output_dir cannot be written" in one_error_line(err)
    assert "precision" not in out  # failed before the setup


def test_output_dir_below_a_file(tmp_path, tiny_dir, data_file, capsys):
    (tmp_path / "afile").write_text("x")
    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    rc, _, err = run_main(capsys, "train", str(cfg), f"--output_dir={tmp_path / 'afile' / 'run'}")
    assert rc == 1 and "is a file, not a folder" in one_error_line(err)


@pytest.mark.parametrize("out", ["/proc/sft-test/x.jsonl", "{tmp}/afile/x.jsonl"])
def test_unwritable_out_fails_and_writes_nothing(tmp_path, tiny_dir, data_file, capsys, out):
    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    (tmp_path / "afile").write_text("x")
    out = out.format(tmp=tmp_path)
    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    rc, _, err = run_main(capsys, "data", "tokenize", str(cfg), "--out", out)
    assert rc == 1 and "--out cannot be" in one_error_line(err)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": ROW["messages"][:1]}) + "\n")
    rc, _, err = run_main(capsys, "generate", str(tiny_dir), "--prompts", str(prompts), "--out", out)
    assert rc == 1 and "--out cannot be" in one_error_line(err)


def test_out_that_is_a_folder_fails_before_any_work(tmp_path, tiny_dir, data_file, capsys, monkeypatch):
    """--out naming an existing folder: one error naming --out, before the model loads (sft eval
    evaluated for minutes, then failed naming its temporary file '.x.123.tmp: Is a directory')."""
    import sft.models.load

    def boom(*a, **kw):
        raise AssertionError("the tokenizer or model was loaded")

    out = tmp_path / "results"
    out.mkdir()
    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": ROW["messages"][:1]}) + "\n")
    monkeypatch.setattr(sft.models.load, "load_tokenizer", boom)
    monkeypatch.setattr(sft.models.load, "load_model", boom)
    for argv in (["eval", str(cfg), "--eval.split=0.5"], ["generate", str(tiny_dir), "--prompts", str(prompts)],
                 ["data", "tokenize", str(cfg)], ["data", "score", str(cfg)]):
        rc, _, err = run_main(capsys, *argv, "--out", str(out))
        assert rc == 1, argv
        assert one_error_line(err).startswith(f"error: {out}: --out is a folder; give a file name, e.g. {out}/"), err
    assert list(out.iterdir()) == []


def test_os_errors_are_one_line_and_real_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import sft.cli as cli

    def fail(exc):
        def fn(args):
            raise exc
        return fn

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\n")
    monkeypatch.setattr(cli, "cmd_data", fail(OSError(errno.EROFS, "Read-only file system", "/ro/out.jsonl")))
    rc, _, err = run_main(capsys, "data", "check", str(cfg))
    line = one_error_line(err)
    assert rc == 1 and line.startswith("error: /ro/out.jsonl: Read-only file system; the filesystem is read-only")
    monkeypatch.setattr(cli, "cmd_data", fail(ValueError("a bug")))
    with pytest.raises(ValueError):  # not an input problem: the traceback stays visible
        main(["data", "check", str(cfg)])
    monkeypatch.setattr(cli, "cmd_data", fail(SftError("x.jsonl: bad")))
    monkeypatch.setenv("SFT_DEBUG", "1")
    with pytest.raises(SftError):  # SFT_DEBUG=1: the traceback of a user error too
        main(["data", "check", str(cfg)])


def test_generate_lists_every_bad_prompt_row_before_loading_the_model(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_bytes(codecs.BOM_UTF8 + b'{"messages": [{"role": "user", "content": "hi"}]}\r\n'
                  b'{"messages": [{"role": "bot", "content": "x"}]}\n{"messages": [[[\n'
                  b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    rc, _, err = run_main(capsys, "generate", str(tmp_path / "no-model"), "--prompts", str(p),
                          "--out", str(tmp_path / "o.jsonl"))
    assert rc == 1 and "3 unusable prompt row(s)" in one_error_line(err)
    assert f"{p}:2: messages[0].role is 'bot'; use one of system, user, assistant, tool" in err
    assert f"{p}:3: not valid JSON" in err
    assert f"{p}:4: contains bytes that are not UTF-8 (0xff at byte" in err
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# never lose a finished run


def test_overwrite_with_wrong_data_path_keeps_the_finished_run(tmp_path, tiny_dir, data_file, capsys):
    """A finished run, then `--overwrite` with a missing data file (the real CLI), with invalid rows,
    and with a model that does not load: each exits 1 with one line, and the run is untouched."""
    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    assert run_main(capsys, "train", str(cfg))[0] == 0
    run = tmp_path / "run"
    before = digest(run)
    assert {"final/model.safetensors", "metrics.jsonl", "report.md", "report.html", "run_state.json"} <= set(before)
    r = subprocess.run([SFT, "train", str(cfg), "--overwrite", f"--data.train={tmp_path / 'missing.jsonl'}"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 1 and "missing.jsonl: data file not found" in one_error_line(r.stderr), r.stderr
    assert digest(run) == before  # final/, metrics, reports, run_state: byte for byte
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    for override, says in [(f"--data.train={bad}", "invalid row"), (f"--model={tmp_path / 'no-model'}", "no-model")]:
        rc, _, err = run_main(capsys, "train", str(cfg), "--overwrite", override)
        assert rc == 1 and says in one_error_line(err), err
        assert digest(run) == before


def test_save_interrupted_inside_final_keeps_the_old_final(tmp_path, tiny_dir, smol_tok):
    """A crash while final/ is written (after some files are out) leaves the old final/, complete."""
    from transformers import AutoModelForCausalLM

    from sft.config import load_config
    from sft.data.chat import resolve_template
    from sft.models.save import save_final

    cfg = load_config(None, [f"--model={tiny_dir}"])
    template = resolve_template("auto", smol_tok)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    save_final(cfg, model, smol_tok, template, tmp_path)
    old = digest(tmp_path / "final")

    class Crash(Exception):
        pass

    def half_then_crash(d, **kw):
        (Path(d) / "model.safetensors").write_bytes(b"half a file")
        raise Crash

    model2 = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    model2.save_pretrained = half_then_crash
    with pytest.raises(Crash):
        save_final(cfg, model2, smol_tok, template, tmp_path)
    assert digest(tmp_path / "final") == old
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))  # still loads


def test_sigkill_during_a_directory_save_leaves_old_or_new(tmp_path):
    """A real SIGKILL halfway through atomic_write_dir leaves the old folder whole (the new one
    appears only by the final rename); the control, writing in place, killed halfway leaves a mixture."""
    script = (
        "import sys, time; from pathlib import Path\n"
        "def write(d):\n"
        "    for i in range(50):\n"
        "        (d / f'part{i}').write_text('new' * 1000)\n"
        "        if i == 25: print('half', flush=True); time.sleep(60)\n"
        "target, how = Path(sys.argv[1]), sys.argv[2]\n"
        "if how == 'in-place': write(target)\n"
        "from sft.atomic import atomic_write_dir\n"
        "if how == 'atomic': atomic_write_dir(target, write)\n"
    )

    def kill_during_save(how: str) -> set[str]:
        target = tmp_path / f"final-{how}"
        target.mkdir()
        for i in range(50):
            (target / f"part{i}").write_text("old" * 1000)
        p = subprocess.Popen([sys.executable, "-c", script, str(target), how], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "half"  # the moment to kill
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert len(list(target.iterdir())) == 50
        return {f.read_text()[:3] for f in target.iterdir()}

    assert kill_during_save("atomic") == {"old"}
    assert kill_during_save("in-place") == {"old", "new"}  # control: half old, half new


def test_full_disk_during_a_checkpoint_fails_clearly_and_keeps_the_last_one(tmp_path, tiny_dir, data_file, capsys,
                                                                             monkeypatch):
    import torch

    from sft.training import checkpoint

    real = checkpoint.save_file
    calls = {"n": 0}

    def save_file(tensors, path, *a, **kw):
        if "step-4" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        calls["n"] += 1
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    rc, _, err = run_main(capsys, "train", str(cfg), "--train.max_steps=6", "--train.save_every=2")
    line = one_error_line(err)
    assert rc == 1 and "No space left on device; free disk space" in line and "--resume" in line
    found = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step-2"]
    from sft.config import load_config
    from sft.models.load import load_model
    from sft.runtime import Runtime
    from sft.training.optim import make_optimizer

    c = load_config(cfg)
    model = load_model(c.model, torch.float32)
    state = checkpoint.load_checkpoint(found[-1], model, make_optimizer(model, c.train), Runtime())
    assert state["step"] == 2


def test_metrics_line_torn_by_a_kill_is_dropped(tmp_path):
    from sft.reporting.run_log import read_rows, truncate_metrics

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_rows(p)] == [1, 2]
    truncate_metrics(p, 2)
    assert p.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    p.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(SftError, match=r"metrics\.jsonl:2: not a metrics row"):
        read_rows(p)


def test_atomic_text_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    from sft.atomic import atomic_write_text
    from sft.reporting import report

    atomic_write_text(tmp_path / "report.md", "old report")

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        report.write_report(tmp_path, {"model": "m"}, [], None, None, None)
    assert (tmp_path / "report.md").read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------
# --overwrite keeps the old run aside until the new one saves


def make_run(out: Path, tag: str, finished: bool = True) -> None:
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_text(tag)
    (out / "metrics.jsonl").write_text(f'{{"step": 1, "loss": 1.0, "tag": "{tag}"}}\n')
    (out / "report.md").write_text(tag)
    if finished:
        (out / "run_state.json").write_text("{}")


def test_previous_run_comes_back_when_the_new_run_saves_nothing(tmp_path):
    from sft.training.run_dir import ASIDE, PreviousRun, check_output_dir

    out = tmp_path / "run"
    make_run(out, "old")
    old = digest(out)
    with pytest.raises(RuntimeError), PreviousRun(out, overwrite=True) as prev:
        prev.set_aside()
        assert not (out / "final").exists() and (out / ASIDE / "final").is_dir()
        (out / "config.yaml").write_text("new")  # what the failing new run wrote
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
        raise RuntimeError("the new run fails before its first checkpoint")
    assert digest(out) == old and not (out / ASIDE).exists()
    # control: once the new run has saved final/, the old run is dropped
    with PreviousRun(out, overwrite=True) as prev:
        prev.set_aside()
        make_run(out, "new")
    assert (out / "final" / "model.safetensors").read_text() == "new" and not (out / ASIDE).exists()
    # without --overwrite nothing moves; inactive (not the writing rank): nothing moves either
    for prev in (PreviousRun(out, overwrite=False), PreviousRun(out, overwrite=True, active=False)):
        with prev:
            prev.set_aside()
            assert not (out / ASIDE).exists()
    # killed between set_aside and settle: the next run refuses without a flag ...
    PreviousRun(out, overwrite=True).set_aside()
    (out / "metrics.jsonl").write_text("partial")
    with pytest.raises(SftError, match="already holds a run"):
        check_output_dir(out, resume=False, overwrite=False)
    # ... and the next --overwrite drops the killed run's partial files and keeps the finished one
    with PreviousRun(out, overwrite=True) as prev:
        prev.set_aside()
        assert not (out / "metrics.jsonl").exists() and (out / ASIDE / "final").is_dir()
    assert (out / "final" / "model.safetensors").read_text() == "new" and not (out / ASIDE).exists()


def test_loop_keeps_the_old_run_when_the_new_one_fails_early(tmp_path, tiny_dir, data_file, monkeypatch, capsys):
    """Integration: --overwrite, then the new run dies before its first checkpoint (NaN stop)."""
    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    assert run_main(capsys, "train", str(cfg))[0] == 0
    before = digest(tmp_path / "run")
    rc, _, err = run_main(capsys, "train", str(cfg), "--overwrite", "--train.lr=1e30", "--train.max_steps=4")
    assert rc == 1 and re.search(r"(loss|gradient norm) is", one_error_line(err))
    assert digest(tmp_path / "run") == before


# ---------------------------------------------------------------------------------------------
# --model: broken model folders


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_a_broken_model_folder_is_one_clear_line(tmp_path, tiny_dir, data_file, capsys, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    if damage == "config":
        (model / "config.json").write_text("{not json")
    else:
        (model / "model.safetensors").write_bytes(b"garbage")
    cfg = write_cfg(tmp_path, model, str(data_file))
    rc, _, err = run_main(capsys, "train", str(cfg))
    assert rc == 1 and "model" in one_error_line(err)


def test_a_template_file_that_is_not_utf8_is_one_clear_line(check, tmp_path):
    (tmp_path / "t.jinja").write_bytes(b"caf\xe9 {{ messages }}")
    rc, _, err = check("good.jsonl", (LINE + "\n").encode(), f"--data.template={tmp_path / 't.jinja'}")
    assert rc == 1 and "t.jinja" in one_error_line(err)


@pytest.mark.parametrize("argv", [
    ["generate", "m", "--prompts", "p.jsonl", "--out", "o.jsonl", "--max-new-tokens", "0"],
    ["generate", "m", "--prompts", "p.jsonl", "--out", "o.jsonl", "--batch-size", "-1"],
    ["chat", "m", "--max-new-tokens", "x"],
    ["data", "preview", "c.yaml", "-n", "-1"],
    ["train", "c.yaml", "--train.lr"],
    ["train"],
])
def test_usage_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("sft")


def test_eval_without_eval_data_names_the_key(tmp_path, tiny_dir, data_file, capsys):
    cfg = write_cfg(tmp_path, tiny_dir, str(data_file))
    rc, _, err = run_main(capsys, "eval", str(cfg))
    assert rc == 1 and "eval" in one_error_line(err)
