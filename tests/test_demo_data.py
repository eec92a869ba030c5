"""The demo data: deterministic, disjoint, sized, and its answers checkable and not guessable."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"


@pytest.fixture(scope="module")
def make_data():
    spec = importlib.util.spec_from_file_location("demo_make_data", DEMO / "make_data.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_deterministic_and_matches_shipped_files(make_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_data.main(a)
    make_data.main(b)
    for name in ("train.jsonl", "eval.jsonl", "dev.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() == (DEMO / name).read_bytes(), f"re-run make_data.py: {name} is stale"


def test_control_other_seed_differs(make_data):
    assert make_data.make(seed=1)[1] != make_data.make()[1]


def test_sizes_disjoint_and_well_formed(make_data):
    train_rows, ev_rows, dev_rows = make_data.make()
    train, ev, dev = ([r["messages"] for r in rows] for rows in (train_rows, ev_rows, dev_rows))
    assert (len(train), len(ev), len(dev)) == (800, 172, 79)
    keys = [{make_data.prompt_key(c) for c in rows} for rows in (train, ev, dev)]
    assert [len(k) for k in keys] == [800, 172, 79]  # no prompt twice within a set ...
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]  # ... nor in two sets
    for conv in train + ev + dev:
        assert conv[-1]["role"] == "assistant"
        assert {m["role"] for m in conv} <= {"system", "user", "assistant"}
    assert any(len(c) > 2 and c[0]["role"] != "system" for c in ev)  # multi-turn
    assert any(c[0]["role"] == "system" for c in ev)
    assert any("Quill" in c[-1]["content"] for c in ev)
    assert any(c[-1]["content"].startswith("{") for c in ev)


def test_eval_references_are_not_guessable(make_data):
    """`contains` must not pass by chance: references are whole framed answers, not a bare '1'."""
    _, ev, dev = make_data.make()
    for conv in (r["messages"] for r in ev + dev):
        ref = conv[-1]["content"]
        assert len(ref) >= 8, ref
        if ref.startswith("{"):
            assert isinstance(json.loads(ref), dict)
        prompt = " ".join(m["content"] for m in conv[:-1])
        assert ref.lower() not in prompt.lower(), ref  # echoing the prompt does not score


def test_demo_config_loads(tmp_path):
    from sft.config import load_config, resolve_path

    cfg = load_config(DEMO / "demo.yaml")
    assert cfg.model == "gemma-3-270m" and cfg.data.template == "gemma"
    assert cfg.eval.before_after and cfg.output_dir == "runs/demo"
    assert resolve_path(cfg, cfg.data.train[0].path).is_file()
    assert resolve_path(cfg, cfg.eval.data[0].path).is_file()
    # choices (eval.every's curve, a sweep's lr) are made on dev.jsonl, not on the test rows
    assert [resolve_path(cfg, s.path).name for s in cfg.eval.dev] == ["dev.jsonl"]


def test_format_rows_carry_constraints_their_references_meet(make_data):
    from sft.evaluation.constraints import check, check_rows

    train, ev, _ = make_data.make()
    fmt = [r for r in ev if "constraints" in r]
    assert len(fmt) == sum(r["messages"][-1]["content"].startswith("{") for r in ev) >= 15
    check_rows([(str(i), r["constraints"]) for i, r in enumerate(fmt)])
    assert all(all(check(r["messages"][-1]["content"], r["constraints"])) for r in fmt)
    assert not any("constraints" in r for r in train)
    # control: a prose reference fails the JSON check
    assert check("The opposite of hot is cold.", fmt[0]["constraints"]) == [False, True]


def test_safety_slice_tagged_and_scored_by_the_refusal_detector(make_data):
    """Harmful rows are answered with the one refusal, which sft's refusal detector recognises;
    benign rows look risky (kill, shoot, steal, blow up) but their answers are not refusals. Eval
    rows carry the category that refusal_rate and over_refusal_rate count."""
    from sft.evaluation.safety import make_detector

    refused = make_detector()
    train, ev, dev = make_data.make()
    # 48 + 48 eval rows: a rate with a ~25-point interval, not ~50; training has more benign rows
    # (16% of 800) than harmful ones (8%): over-refusal is the failure users notice; dev has 24 + 24
    for rows, n_harm, n_ok in ((train, 64, 128), (ev, 48, 48), (dev, 24, 24)):
        harm = [r for r in rows if r.get("category") == "harmful"]
        ok = [r for r in rows if r.get("category") == "benign"]
        assert (len(harm), len(ok)) == (n_harm, n_ok)
        assert {r["messages"][-1]["content"] for r in harm} == {make_data.REFUSAL}
        assert all(refused(r["messages"][-1]["content"]) for r in harm)
        assert not any(refused(r["messages"][-1]["content"]) for r in ok)
        assert not any(refused(r["messages"][-1]["content"]) for r in rows if "category" not in r)
        risky = ("kill", "shoot", "steal", "blow up")
        assert all(any(w in r["messages"][0]["content"] for w in risky) for r in ok)
    # benign values are held out: no benign eval or dev answer is a train answer (a model must
    # generalise), and none is in both eval and dev (a choice on dev does not see eval's values)
    train_answers = {r["messages"][-1]["content"] for r in train}
    benign = [{r["messages"][-1]["content"] for r in rows if r.get("category") == "benign"} for rows in (ev, dev)]
    assert not (benign[0] | benign[1]) & train_answers and not benign[0] & benign[1]


def test_demo_data_check_shows_quality(tmp_path, smol_tok, monkeypatch):
    """`sft data check` on the demo: the quality section lists the eval answers found word for
    word in train (contamination) and no refusal of a harmful row as boilerplate."""
    import io

    import sft.models.load
    from sft.config import load_config
    from sft.data import commands

    monkeypatch.setattr(sft.models.load, "load_tokenizer", lambda name, trust_remote_code=False, **kw: smol_tok)
    cfg = load_config(DEMO / "demo.yaml", [f"--data.cache_dir={tmp_path}"])
    out = io.StringIO()
    assert commands.check(cfg, as_json=True, stream=out) == 0
    q = json.loads(out.getvalue())["quality"]
    assert len(q["contamination"]) >= 20
    assert q["boilerplate"] == [] and q["empty_responses"] == [] and q["truncated_responses"] == []
    assert q["placeholders"] == []  # the persona says its own name: nothing left to fill in
