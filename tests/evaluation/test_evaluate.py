"""Metrics (each with a passing and a failing case), held-out loss, forgetting, evaluate()."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_llama
from sft.config import load_config
from sft.errors import SftError
from sft.evaluation.evaluate import evaluate, forgetting, summary
from sft.evaluation.generate import Generation
from sft.evaluation.reference import reference_text
from sft.evaluation.task import score, split_reference


@pytest.mark.parametrize(
    ("reply", "reference", "metric", "ok"),
    [
        (" 42\n", "42", "exact", True),
        ("42.", "42", "exact", False),
        ("My name is QUILL, hi.", "my name is quill", "contains", True),
        ("My name is Quin.", "my name is quill", "contains", False),
        ("  42 ", r"^\s*42\s*$", "regex", True),
        ("142", r"^\s*42\s*$", "regex", False),
        ('{"name": "Maria", "city": "Lisbon", "extra": 1}', '{"name": "Maria", "city": "Lisbon"}', "json", True),
        ('```json\n{"answer": 8}\n```', '{"answer": 8}', "json", True),
        ('{"name": "Maria", "city": "Porto"}', '{"name": "Maria", "city": "Lisbon"}', "json", False),
        ('{"name": "Maria"}', '{"name": "Maria", "city": "Lisbon"}', "json", False),
        ('{"answer": "8"}', '{"answer": 8}', "json", False),
        ("The answer is {\"answer\": 8}", '{"answer": 8}', "json", False),
        ("[1, 2]", '{"answer": 8}', "json", False),
    ],
)
def test_score(reply, reference, metric, ok):
    assert score(reply, reference, metric) is ok


def test_score_errors():
    with pytest.raises(SftError, match="not a valid regex"):
        score("x", "(", "regex")
    with pytest.raises(SftError, match="not a JSON object"):
        score("{}", "[1]", "json")
    with pytest.raises(SftError, match="use one of exact, contains, regex, json"):
        score("x", "x", "fuzzy")


def test_split_reference_takes_last_assistant():
    from sft.data.types import Conversation, Message

    c = Conversation([Message("system", "s"), Message("user", "a"), Message("assistant", "b"),
                      Message("user", "c"), Message("assistant", "d")])
    msgs, ref = split_reference(c)
    assert [m.content for m in msgs] == ["s", "a", "b", "c"] and ref == "d"
    assert split_reference(Conversation([Message("user", "a")])) is None


@pytest.fixture(scope="module")
def m(smol_tok):
    return tiny_llama(len(smol_tok), seed=0)


def test_forgetting_kl_zero_to_itself_and_positive_to_other(smol_tok, m):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    same = forgetting(m, smol_tok, text, base_model=m)
    assert same["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(same["reference_perplexity"]) and same["reference_perplexity"] > 1
    other = forgetting(m, smol_tok, text, base_model=tiny_llama(len(smol_tok), seed=1))  # the control
    assert other["kl_to_base"] > 1e-3
    assert other["reference_perplexity"] == pytest.approx(same["reference_perplexity"], rel=1e-5)
    assert "kl_to_base" not in forgetting(m, smol_tok, text)


def test_reference_text_default_and_file(tmp_path, monkeypatch):
    from sft.evaluation.reference import REFERENCE_SHA256, REFERENCE_VERSION, load_reference

    ref = load_reference(None)
    assert ref.version == REFERENCE_VERSION == "stdlib-prose-v1"
    assert ref.sha256 == REFERENCE_SHA256  # the shipped file is the pinned snapshot, unchanged
    assert len(ref.text.encode("utf-8")) == 156_131 and ">>>" not in ref.text
    monkeypatch.setattr("sft.evaluation.reference.REFERENCE_SHA256", "0" * 64)  # control: a changed file
    with pytest.raises(SftError, match=r"stdlib_prose_v1\.txt.*modified"):
        load_reference(None)
    f = tmp_path / "ref.txt"
    f.write_text("Plain words for testing.")
    assert load_reference(str(f)).version == "file:ref.txt" and load_reference(str(f)).sha256 != REFERENCE_SHA256
    f = tmp_path / "ref.txt"
    f.write_text("Plain words for testing.")
    assert reference_text(str(f)) == "Plain words for testing."
    with pytest.raises(SftError, match="not found"):
        reference_text(str(tmp_path / "missing.txt"))


def test_reference_budget_samples_the_whole_shipped_text(smol_tok):
    """eval.reference_tokens (default 16384) is under half the shipped text, so the scored windows
    are spread over it: the first and last windows come from its first and last tenth. The size
    was chosen with bench/reference_stability.py (forgetting ratio stable to 1%, bench/RESULTS.md)."""
    from sft.config import EvalConfig
    from sft.evaluation.evaluate import REFERENCE_WINDOW, reference_windows
    from sft.evaluation.reference import load_reference

    ids = smol_tok(load_reference(None).text, add_special_tokens=False)["input_ids"]
    budget = EvalConfig().reference_tokens
    assert budget == 16384 and len(ids) > 2 * budget
    windows = reference_windows(ids, budget)
    assert len(windows) == budget // REFERENCE_WINDOW and all(len(w) == REFERENCE_WINDOW for w in windows)
    assert windows[0] == ids[:REFERENCE_WINDOW]
    last = max(i for i in range(0, len(ids), REFERENCE_WINDOW) if ids[i : i + REFERENCE_WINDOW] == windows[-1])
    assert last > 0.9 * len(ids) - 2 * REFERENCE_WINDOW
    short = ids[:1000]
    assert reference_windows(short, budget) == [short[s : s + 128] for s in range(0, 1000, 128)]  # all of it


EVAL_ROWS = [
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]},
    {"messages": [{"role": "user", "content": "Name?"}, {"role": "assistant", "content": "My name is Quill."}]},
    {"messages": [{"role": "user", "content": "I live in Oslo."}, {"role": "assistant", "content": "Noted."},
                  {"role": "user", "content": "Where do I live?"}, {"role": "assistant", "content": "You live in Oslo."}]},
]


def _cfg(tmp_path, metric_override: str | None = None):
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    (tmp_path / "exact.jsonl").write_text(json.dumps(EVAL_ROWS[0]) + "\n")
    src = [{"path": "eval.jsonl"}]
    if metric_override:
        src.append({"path": "exact.jsonl", "metric": metric_override})
    (tmp_path / "ref.txt").write_text("General English text to measure forgetting on, kept short for speed. " * 8)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({
        "model": "smollm2-135m-instruct", "output_dir": str(tmp_path / "run"),
        "data": {"template": "chatml", "cache_dir": str(tmp_path / "cache")}, "train": {"precision": "fp32"},
        "eval": {"data": src, "metric": "contains", "max_new_tokens": 4, "samples": 2, "batch_size": 2,
                 "reference": str(tmp_path / "ref.txt")},
    }))
    return load_config(cfg_file)


def _plain_loss(model, tok, cfg) -> float:
    """Token-mean CE over the eval examples' trained tokens, written with plain HF + torch (no sft
    loss code): the independent reference evaluate()'s eval_loss must match."""
    import torch
    import torch.nn.functional as F

    from sft.data.pipeline import build_dataset

    total, n = 0.0, 0
    with torch.no_grad():
        for ex in build_dataset(cfg, tok, "eval", use_cache=False).examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
    return total / n


def _plain_replies(model, tok, cfg) -> list[list[int]]:
    """Greedy replies with plain ``model.generate``, one prompt at a time, cut at <|im_end|>."""
    import torch

    from sft.data.chat import prompt_ids
    from sft.data.pipeline import load_conversations

    out = []
    for conv in load_conversations(cfg, "eval")[0]:
        ids = prompt_ids(split_reference(conv)[0], tok, "chatml")
        with torch.no_grad():
            seq = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=cfg.eval.max_new_tokens, eos_token_id=[2], pad_token_id=2)
        new = seq[0, len(ids):].tolist()
        out.append(new[: new.index(2)] if 2 in new else new)
    return out


def _untied(vocab_size: int, seed: int):
    """conftest's tiny_llama ties its embeddings, so greedy decoding repeats the last prompt token
    for any seed; an untied head with a larger init gives replies that depend on the weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=2)).eval()


def test_evaluate_matches_independent_computations(tmp_path, smol_tok):
    """eval_loss, the replies (through mean_response_tokens and the samples) and the reference
    perplexity each equal a computation that shares no code with evaluate(); the control: a
    differently seeded model gives other values, so the equalities are not vacuous."""
    import torch

    cfg = _cfg(tmp_path)
    m = _untied(len(smol_tok), seed=0)
    m.train()
    a = evaluate(cfg, m, smol_tok, "chatml", base_model=m, progress=False)
    assert m.training  # restored
    assert a["eval_loss"] == pytest.approx(_plain_loss(m, smol_tok, cfg), rel=1e-5)
    assert a["perplexity"] == pytest.approx(math.exp(a["eval_loss"]))
    replies = _plain_replies(m, smol_tok, cfg)
    assert a["mean_response_tokens"] == pytest.approx(sum(map(len, replies)) / len(replies))
    assert [s["reply"] for s in a["samples"]] == [smol_tok.decode(r, skip_special_tokens=True) for r in replies[:2]]
    ref_ids = smol_tok(reference_text(cfg.eval.reference), add_special_tokens=False)["input_ids"]
    assert len(ref_ids) < 1024  # scored whole, in windows of 128 tokens each after a BOS
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ref_ids), 128):
            x = torch.tensor([[smol_tok.bos_token_id, *ref_ids[s : s + 128]]])
            mean = float(m(input_ids=x, labels=x).loss)  # HF's own shifted CE, mean over the window
            nll, count = nll + mean * (x.shape[1] - 1), count + x.shape[1] - 1
    assert a["forgetting"]["reference_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert a["forgetting"]["reference_tokens"] == count
    assert a["forgetting"]["kl_to_base"] == pytest.approx(0.0, abs=1e-6)
    assert a["forgetting"]["reference"] == "file:ref.txt" and len(a["forgetting"]["reference_sha256"]) == 64
    assert a["n_examples"] == 3 and len(a["samples"]) == 2
    assert set(a["samples"][0]) == {"prompt", "reference", "reply", "correct", "stopped"}
    assert a["samples"][0]["reference"] == "2 + 3 = 5."
    # per-row outcomes that `sft compare` pairs, and the intervals built from them
    rows = a["rows"]
    assert rows["key"] == ["eval.jsonl:1", "eval.jsonl:2", "eval.jsonl:3"]
    assert rows["tokens"] == [len(r) for r in replies] and rows["category"] == "---" and rows["refused"] == "---"
    assert rows["correct"].count("1") / 3 == a["task_accuracy"] and len(rows["stopped"]) == 3
    assert sum(a["losses"]["nll"]) / sum(a["losses"]["tokens"]) == pytest.approx(a["eval_loss"], rel=1e-4)
    assert sum(a["losses"]["tokens"]) == a["eval_tokens"] and len(a["losses"]["key"]) == 3
    assert a["n"]["task_accuracy"] == 3 and a["n"]["forgetting"]["reference_perplexity"] == len(range(0, len(ref_ids), 128))
    for key in ("task_accuracy", "stop_rate", "eval_loss", "perplexity"):
        lo, hi = a["intervals"][key]
        assert lo <= a[key] <= hi, key
    assert len(a["forgetting"]["window_nll"]) == 1  # a one-window reference: nothing to resample
    assert a["intervals"]["forgetting"] == {"reference_perplexity": None, "kl_to_base": None}
    json.dumps(a)  # JSON-able
    assert "task accuracy" in summary(a)

    other = _untied(len(smol_tok), seed=1)  # the control
    b = evaluate(cfg, other, smol_tok, "chatml", progress=False)
    assert abs(b["eval_loss"] - a["eval_loss"]) > 1e-3
    assert abs(b["forgetting"]["reference_perplexity"] / a["forgetting"]["reference_perplexity"] - 1) > 1e-3
    assert _plain_replies(other, smol_tok, cfg) != replies


def test_evaluate_scores_replies_with_source_metric(tmp_path, smol_tok, monkeypatch, m):
    """Replies are stubbed: the first eval row gets a correct-but-verbose reply. `contains`
    accepts it; the same row from a source with `metric: exact` must reject it."""
    cfg = _cfg(tmp_path, metric_override="exact")
    replies = {"2 + 3 = 5.": "Sure! 2 + 3 = 5.", "My name is Quill.": "I am Bob.", "You live in Oslo.": "You live in Oslo."}
    seen_prompts = []

    def fake_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=8, progress=False, rt=None):
        seen_prompts.extend(prompts)
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            ref = next(r for q, r in [("2 + 3", "2 + 3 = 5."), ("Name?", "My name is Quill."),
                                      ("Where do I live", "You live in Oslo.")] if q in text)
            out.append(Generation(text=replies[ref], token_ids=[1, 2, 3], stopped=True, stop_id=2))  # <|im_end|>
        return out

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    r = evaluate(cfg, m, smol_tok, "chatml", progress=False)
    assert r["n_examples"] == 4
    assert r["task_accuracy"] == pytest.approx(2 / 4)  # contains: yes, no, yes; exact: no
    assert r["accuracy_by_source"] == {"eval.jsonl": pytest.approx(2 / 3), "exact.jsonl": 0.0}
    assert r["stop_rate"] == 1.0 and r["mean_response_tokens"] == 3.0
    # the prompt ends with the generation prompt and holds the earlier turns, not the reference
    multi = smol_tok.decode(seen_prompts[2] if "Oslo" in smol_tok.decode(seen_prompts[2]) else seen_prompts[0])
    assert multi.endswith("<|im_start|>assistant\n")
    assert "You live in Oslo." not in multi


def test_stop_rate_counts_the_end_of_turn_token_not_eos(tmp_path, gemma_tok, monkeypatch):
    """Gemma's template ends a turn with <end_of_turn>; generation also stops on <eos>. The stop
    rate counts <end_of_turn> only, as the README defines it. Replies are stubbed: one ends with
    <end_of_turn>, one with <eos>, one runs to the limit -> 1/3. Control: counting every stop
    (the old definition, Generation.stopped) gives 2/3 on the same replies."""
    from conftest import tiny_gemma
    from sft.data.chat import end_of_turn_tokens, stop_token_ids

    marker, (eot,) = end_of_turn_tokens(gemma_tok, "gemma")
    eos = gemma_tok.eos_token_id
    assert marker == "<end_of_turn>" and eot != eos and set(stop_token_ids(gemma_tok, "gemma")) == {eot, eos}
    ends = iter([eot, eos, None])

    def fake_generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=8, progress=False, rt=None):
        return [Generation("x", [5], (e := next(ends)) is not None, e) for _ in prompts]

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    cfg = _cfg(tmp_path)
    cfg.data.template = "gemma"
    r = evaluate(cfg, tiny_gemma(len(gemma_tok)), gemma_tok, "gemma", progress=False)
    assert r["n_examples"] == 3 and r["stop_token"] == "<end_of_turn>"
    assert r["stop_rate"] == pytest.approx(1 / 3)
    assert [s["stopped"] for s in r["samples"]] == [True, False]
    old = [e is not None for e in (eot, eos, None)]  # control: any stop token counted
    assert sum(old) / 3 == pytest.approx(2 / 3) != r["stop_rate"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_every_forward_runs_under_the_run_precision(tmp_path, smol_tok, precision):
    """Held-out loss, generation and forgetting all run under the run's precision: bf16 autocast
    for a bf16 run (as training computed), none for fp32 (the control: the same hook then sees
    autocast off everywhere, so the bf16 assertion is not vacuous)."""
    import torch

    _cfg(tmp_path)  # writes c.yaml and its data
    cfg = load_config(tmp_path / "c.yaml", [f"--train.precision={precision}"])
    m = _untied(len(smol_tok), seed=0)
    seen: list[bool] = []
    m.model.register_forward_pre_hook(lambda mod, args: seen.append(torch.is_autocast_enabled("cpu")))
    result = evaluate(cfg, m, smol_tok, "chatml", base_model=None, progress=False)
    # 3 held-out examples (one forward each), >= 3 generation steps, 1 reference window
    assert len(seen) >= 7
    assert set(seen) == {precision == "bf16"}
    assert result["precision"] == precision


@pytest.mark.parametrize(("metric", "bad", "why"), [("regex", "([unclosed", "not a valid regex"),
                                                    ("json", "not json", "not a JSON object")])
def test_bad_references_stop_before_generation_naming_every_row(tmp_path, smol_tok, monkeypatch, m, metric, bad, why):
    """A reference the metric cannot use (a broken regex, a json reference that is no JSON object)
    is an error naming each such row's file:line, raised before any reply is generated (it was
    raised after generating every reply, for the first bad row met, without its location)."""
    good = r"\d" if metric == "regex" else '{"a": 1}'
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": ref}]}
            for i, ref in enumerate([good, bad, good, bad])]
    cfg = _cfg(tmp_path)
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg.eval.metric = metric
    generated = []

    def fake_generate(model, tokenizer, prompts, *a, **k):
        generated.extend(prompts)
        return [Generation("x", [5], True, 2) for _ in prompts]

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    with pytest.raises(SftError, match=why) as e:
        evaluate(cfg, m, smol_tok, "chatml", progress=False)
    assert "eval.jsonl:2" in str(e.value) and "eval.jsonl:4" in str(e.value)
    assert generated == []


def test_eval_rows_longer_than_max_length_are_named_not_silently_left_out_of_the_loss(tmp_path, smol_tok, monkeypatch,
                                                                                       m, capsys):
    """Eval conversations longer than data.max_length are dropped from the held-out loss
    (data.truncation: drop) but still generated for; evaluate says so (the loss was silently over
    fewer rows than task accuracy, or "-" with no reason when none fitted)."""
    def fake_generate(model, tokenizer, prompts, *a, **k):
        return [Generation("x", [5], True, 2) for _ in prompts]

    monkeypatch.setattr("sft.evaluation.generate.generate_batch", fake_generate)
    cfg = _cfg(tmp_path)
    r = evaluate(cfg, m, smol_tok, "chatml", progress=False)
    assert r["n"]["eval_loss"] == 3 and "max_length" not in capsys.readouterr().err  # control: all fit
    cfg.data.max_length = 39  # the rows are 27, 19 and 40 tokens: the two-turn row no longer fits
    r = evaluate(cfg, m, smol_tok, "chatml", progress=False)
    assert r["n"]["eval_loss"] == 2 and r["n_examples"] == 3
    err = capsys.readouterr().err
    assert "eval loss: 1 of 3 eval examples are longer than data.max_length 39 and left out of it" in err
    cfg.data.max_length = 8
    r = evaluate(cfg, m, smol_tok, "chatml", progress=False)
    assert r["eval_loss"] is None
    assert "eval loss: 3 of 3 eval examples are longer than data.max_length 8" in capsys.readouterr().err
