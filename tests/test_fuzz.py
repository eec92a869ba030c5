"""Property-based fuzzing of everything that reads user input (issue 15).

The property, for every generated input: the outcome is success or a clear error (SftError, or
`sft` exiting 1 with an ``error:`` line / exit 2 for usage), never another exception, and never
partial output (no half-written cache entry or --out file).

Inputs: random and mutated rows of every format (messages, sharegpt, alpaca, prompt_completion,
text) in every file type (JSONL, JSON, CSV, Parquet), random Unicode (surrogates included) in
every message field, random bytes, every truncation of a small sample file, and random config
overrides. Hypothesis runs derandomized (a fixed seed) with a bounded number of examples, so the
default run takes seconds; ``-m slow`` runs many more.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import itertools
import json
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_ROWS
from sft.cli import main
from sft.config import Config, load_config
from sft.data.pipeline import build_dataset
from sft.errors import SftError

COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
FAST = settings(max_examples=25, **COMMON)
LONG = settings(max_examples=600, **COMMON)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# ---------------------------------------------------------------------------------------------
# strategies

# any code point (surrogates included), with the ones that break readers most often drawn first:
# lone surrogates, NUL, BOM, line separators, CR
SPECIALS = ["\ud800", "\udfff", "\udc80", "\x00", "\ufeff", "\u2028", "\r", "\x85"]
chars = st.sampled_from(SPECIALS) | st.characters(exclude_categories=())
text = st.lists(chars, max_size=24).map("".join) | st.sampled_from(["", " ", "\n", "<think>x</think>y",
                                                                    "<|im_end|>", "{{ x }}"])
scalar = st.none() | st.booleans() | st.integers() | st.floats() | text
json_value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                          max_leaves=8)
anything = text | json_value  # what a field may hold in a mutated row
role = st.sampled_from(["system", "user", "assistant", "tool"]) | anything

message = st.fixed_dictionaries(
    {"role": role, "content": text | anything},
    optional={"train": st.booleans() | anything, "tool_calls": anything, "name": anything,
              "tool_call_id": anything, "reasoning_content": anything},
)
ROW = {
    "messages": st.fixed_dictionaries({"messages": st.lists(message, max_size=4) | anything},
                                      optional={"tools": anything}),
    "sharegpt": st.fixed_dictionaries(
        {"conversations": st.lists(st.fixed_dictionaries(
            {"from": st.sampled_from(["human", "gpt", "system", "function_call", "observation"]) | anything,
             "value": text | anything}), max_size=4) | anything},
        optional={"system": anything, "tools": anything}),
    "alpaca": st.fixed_dictionaries({"instruction": text | anything, "output": text | anything},
                                    optional={"input": anything, "system": anything, "history": anything}),
    "prompt_completion": st.fixed_dictionaries({"prompt": text | st.lists(message, max_size=2) | anything,
                                                "completion": text | st.lists(message, max_size=2) | anything}),
    "text": st.fixed_dictionaries({"text": text | anything}),
}
FORMATS = tuple(ROW)


@st.composite
def rows_of(draw, fmt: str) -> list:
    """Rows of one format, some mutated: a key dropped, a key added, or a value of another type."""
    rows = draw(st.lists(ROW[fmt], min_size=0, max_size=4))
    out = []
    for row in rows:
        how = draw(st.sampled_from(["keep", "keep", "drop", "add", "replace"]))
        if how == "drop" and row:
            row.pop(draw(st.sampled_from(sorted(row))))
        elif how == "add":
            row[draw(text)] = draw(anything)
        elif how == "replace":
            row = draw(anything)
        out.append(row)
    return out


def encode_rows(rows: list, suffix: str, bom: bool, crlf: bool, ascii_only: bool) -> bytes | None:
    """The bytes of a file holding ``rows``; None when the format cannot hold them (Parquet types)."""
    nl = "\r\n" if crlf else "\n"
    if suffix == ".jsonl":
        body = nl.join(json.dumps(r, ensure_ascii=ascii_only) for r in rows) + nl
    elif suffix == ".json":
        body = json.dumps(rows, ensure_ascii=ascii_only, indent=1).replace("\n", nl)
    elif suffix == ".csv":
        flat = [r for r in rows if isinstance(r, dict)]
        keys = list(dict.fromkeys(k for r in flat for k in r))
        buf = io.StringIO()
        if keys:
            w = csv.DictWriter(buf, fieldnames=keys, lineterminator=nl)
            w.writeheader()
            for r in flat:
                w.writerow({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in r.items()})
        body = buf.getvalue()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist([r for r in rows if isinstance(r, dict)])
            sink = io.BytesIO()
            pq.write_table(table, sink)
        except Exception:  # pyarrow cannot type mixed values or encode surrogates: not a Parquet file
            return None
        return sink.getvalue()
    data = body.encode("utf-8", errors="surrogatepass")  # lone surrogates become bytes that are not UTF-8
    return (b"\xef\xbb\xbf" + data) if bom else data


# ---------------------------------------------------------------------------------------------
# the property


def data_cfg(path: Path, tmp: Path, *extra: str) -> Config:
    return load_config(None, [f"--data.train={path}", "--data.max_length=64", f"--data.cache_dir={tmp / 'cache'}",
                              *extra])


def assert_clear_or_success(cfg: Config, tok) -> None:
    """build_dataset (reading, validating, tokenizing, caching) succeeds or raises SftError; a
    failure leaves no cache entry, a success a complete one."""
    cache = Path(cfg.data.cache_dir or "")
    before = set(cache.glob("*")) if cache.is_dir() else set()
    try:
        ds = build_dataset(cfg, tok, "train")
    except SftError as e:
        msg = str(e)
        assert msg.strip() and "Traceback" not in msg
        assert (set(cache.glob("*")) if cache.is_dir() else set()) == before  # nothing half-written
        return
    assert all(len(e.input_ids) == len(e.labels) <= cfg.data.max_length for e in ds.examples)
    entries = set(cache.rglob("*")) if cache.is_dir() else set()
    assert not any(p.name.endswith(".tmp") for p in entries)
    assert {p.suffix for p in entries if p.is_file()} <= {".json", ".npy"}
    # the split's pick, and the token stores; "sources" and "quality" (the per-source caches) apart
    picks = [p for p in cache.glob("*") if p.name not in ("sources", "quality")]
    assert all({q.name for q in p.iterdir()} == {"meta.json", "which.npy", "index.npy"} for p in picks)
    assert all((p / "store.json").is_file() for p in cache.glob("sources/*"))
    assert all(any(p.iterdir()) for p in cache.glob("quality/*"))  # no empty (half-written) quality entry


@pytest.fixture()
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_n = itertools.count()


def write(work: Path, suffix: str, data: bytes) -> Path:
    p = work / f"f{next(_n)}{suffix}"
    p.write_bytes(data)
    return p


def rows_property(work, tok, fmt, suffix, rows, bom, crlf, ascii_only, on_invalid, forced):
    data = encode_rows(rows, suffix, bom, crlf, ascii_only)
    if data is None:
        return
    p = write(work, suffix, data)
    extra = [f"--data.on_invalid={on_invalid}"] + ([f"--data.format={fmt}"] if forced else [])
    assert_clear_or_success(data_cfg(p, work, *extra), tok)


rows_args = dict(
    fmt=st.sampled_from(FORMATS), suffix=st.sampled_from(SUFFIXES), bom=st.booleans(), crlf=st.booleans(),
    ascii_only=st.booleans(), on_invalid=st.sampled_from(["error", "skip"]), forced=st.booleans(),
)


@FAST
@given(data=st.data(), **rows_args)
def test_random_and_mutated_rows(work, smol_tok, data, fmt, suffix, bom, crlf, ascii_only, on_invalid, forced):
    rows = data.draw(rows_of(fmt))
    rows_property(work, smol_tok, fmt, suffix, rows, bom, crlf, ascii_only, on_invalid, forced)


@pytest.mark.slow
@LONG
@given(data=st.data(), **rows_args)
def test_random_and_mutated_rows_long(work, smol_tok, data, fmt, suffix, bom, crlf, ascii_only, on_invalid, forced):
    rows = data.draw(rows_of(fmt))
    rows_property(work, smol_tok, fmt, suffix, rows, bom, crlf, ascii_only, on_invalid, forced)


@FAST
@given(suffix=st.sampled_from(SUFFIXES), raw=st.binary(max_size=200))
def test_random_bytes(work, smol_tok, suffix, raw):
    assert_clear_or_success(data_cfg(write(work, suffix, raw), work), smol_tok)


@FAST
@given(fmt=st.sampled_from(FORMATS), field=st.sampled_from(["user", "assistant", "system"]), value=text)
def test_random_unicode_in_every_message_field(work, smol_tok, fmt, field, value):
    """Valid rows whose one field is random Unicode (surrogates, controls, template syntax)."""
    u, a, s = (value if field == f else default for f, default in
               (("user", "Hi"), ("assistant", "Hello"), ("system", "Be brief.")))
    row = {
        "messages": {"messages": [{"role": "system", "content": s}, {"role": "user", "content": u},
                                  {"role": "assistant", "content": a}]},
        "sharegpt": {"system": s, "conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]},
        "alpaca": {"system": s, "instruction": u, "input": "", "output": a},
        "prompt_completion": {"prompt": u, "completion": a},
        "text": {"text": u + a},
    }[fmt]
    for ascii_only in (True, False):
        rows_property(work, smol_tok, fmt, ".jsonl", [row], False, False, ascii_only, "error", False)


def sample_files() -> dict[str, bytes]:
    """A small valid file of each type (two rows), to truncate at every byte."""
    rows = [{"instruction": "Add 1 and 2.", "output": "3 — done ✓"}, {"instruction": "Name a colour.", "output": "Blue."}]
    out = {s: encode_rows(rows, s, bom=False, crlf=s == ".csv", ascii_only=False) for s in SUFFIXES}
    out[".jsonl"] = encode_rows(TINY_ROWS[-1:] + rows[:1], ".jsonl", bom=True, crlf=False, ascii_only=False)
    return {s: b for s, b in out.items() if b is not None}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_at_every_byte(work, smol_tok, suffix):
    full = sample_files()[suffix]
    ok = 0
    for n in range(len(full) + 1):
        cfg = data_cfg(write(work, suffix, full[:n]), work, "--data.on_invalid=skip")
        try:
            build_dataset(cfg, smol_tok, "train", use_cache=False)
            ok += 1
        except SftError as e:
            assert str(e).strip()
    assert ok >= 1  # control: the whole file (n = len) is read


# ---------------------------------------------------------------------------------------------
# the CLI: random config overrides and files through `sft data check` / `sft data tokenize`


def dotted_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += dotted_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = dotted_keys()
raw_value = st.sampled_from(["", "null", "0", "-1", "1", "2", "0.5", "1e-5", "1e400", "nan", "-inf", "true",
                             "false", "[]", "{}", "[a, b]", "{a: 1}", "x", "auto", "ÿ", "'", "[", ": :", "1e9", "100000000000"]) | text
override = st.tuples(st.sampled_from(KEYS) | text, raw_value).map(lambda kv: f"--{kv[0]}={kv[1]}")


@pytest.fixture()
def cli(work, smol_tok, monkeypatch, data_file):
    """Run `sft` in-process in ``work`` with the session tokenizer (a tokenizer load costs ~1 s)."""
    monkeypatch.chdir(work)
    monkeypatch.setattr("sft.models.load.load_tokenizer", lambda *a, **kw: smol_tok)
    cfg = work / "cfg.yaml"
    cfg.write_text(f"model: smollm2-135m-instruct\ndata:\n  train: [{data_file}]\n  cache_dir: {work / 'cache'}\n"
                   "train:\n  epochs: 2\n")

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(argv))
            except SystemExit as e:  # argparse: a usage error is exit 2
                rc = e.code if isinstance(e.code, int) else 2
                assert rc == 2
        return rc, out.getvalue(), err.getvalue()

    run.cfg = cfg  # type: ignore[attr-defined]
    return run


def assert_clear(rc: int, out: str, err: str) -> None:
    assert rc in (0, 1, 2), (rc, out, err)
    assert "Traceback" not in err
    if rc == 1:
        assert "error:" in err or "problems" in out, (out, err)


@FAST
@given(overrides=st.lists(override, max_size=3))
def test_random_config_overrides(cli, overrides):
    assert_clear(*cli("data", "check", str(cli.cfg), *overrides))


@pytest.mark.slow
@LONG
@given(overrides=st.lists(override, max_size=4))
def test_random_config_overrides_long(cli, overrides):
    assert_clear(*cli("data", "check", str(cli.cfg), *overrides))


@FAST
@given(data=st.data(), fmt=st.sampled_from(FORMATS), suffix=st.sampled_from(SUFFIXES))
def test_cli_check_and_tokenize_random_files(cli, work, data, fmt, suffix):
    raw = encode_rows(data.draw(rows_of(fmt)), suffix, data.draw(st.booleans()), data.draw(st.booleans()),
                      data.draw(st.booleans()))
    if raw is None:
        return
    p = write(work, suffix, raw)
    rc, out, err = cli("data", "check", str(cli.cfg), f"--data.train={p}")
    assert_clear(rc, out, err)
    dst = work / f"tok{next(_n)}.jsonl"
    rc, out, err = cli("data", "tokenize", str(cli.cfg), f"--data.train={p}", "--out", str(dst))
    assert_clear(rc, out, err)
    assert dst.exists() == (rc == 0)  # --out appears whole, or not at all
    assert not list(work.glob(f".{dst.name}*"))  # no temporary left


class ModelLoad(Exception):
    """Raised instead of loading a model: the prompts file was accepted."""


@FAST
@given(data=st.data())
def test_generate_prompts_files(work, monkeypatch, data):
    """`sft generate --prompts`: a random (mutated) prompts file is accepted whole or refused with
    FILE:LINE problems before the model loads."""
    import sft.evaluation.generate as gen

    def load(*a, **kw):
        raise ModelLoad

    monkeypatch.setattr(gen, "_load", load)
    rows = data.draw(rows_of("messages"))
    raw = encode_rows(rows, ".jsonl", data.draw(st.booleans()), data.draw(st.booleans()), data.draw(st.booleans()))
    assert raw is not None
    p = write(work, ".jsonl", raw)
    try:
        gen.generate_file("m", str(p), str(work / "out.jsonl"))
    except ModelLoad:
        return
    except SftError as e:
        assert f"{p}:" in str(e)
    assert not (work / "out.jsonl").exists()
