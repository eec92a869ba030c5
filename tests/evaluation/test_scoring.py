"""``sft data score``: the reply scores against an independent computation with plain transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from conftest import TINY_ROWS
from sft.cli import main
from sft.config import load_config
from sft.evaluation.scoring import compute_scores, reply_header


def _config(tmp_path, data, model, **data_keys) -> str:
    cfg = {"model": str(model), "data": {"train": [str(data)], "cache_dir": str(tmp_path / "cache"), **data_keys}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _by_hand(model, tok, messages: list[dict], header: str = "<|im_start|>assistant\n") -> list[dict]:
    """loss / loss_alone / ifd / eot_prob of every assistant turn: the ChatML prompt masked by hand,
    the reply alone after '<|im_start|>assistant\\n' (the generation prompt), one unpadded forward each."""
    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def logprobs(seq: list[int]) -> torch.Tensor:  # [T-1]: log p(seq[t] | seq[:t]) at t = 1..T-1
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0].float()
        return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]

    full = ids(tok.apply_chat_template(messages, tokenize=False))
    end = ids("<|im_end|>")
    assert len(end) == 1
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = ids(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        reply = ids(m["content"])
        assert full[: len(prompt) + len(reply) + 1] == prompt + reply + end  # the reply as trained
        lp = logprobs(prompt + reply + end)
        given = lp[len(prompt) - 1 : len(prompt) - 1 + len(reply)]
        head = ids(header)
        alone = logprobs(head + reply)[len(head) - 1 :]
        loss, loss_alone = -given.mean().item(), -alone.mean().item()
        out.append({"loss": loss, "loss_alone": loss_alone, "ifd": loss / loss_alone,
                    "eot_prob": math.exp(lp[len(prompt) - 1 + len(reply)].item())})
    return out


def test_scores_match_plain_transformers(tmp_path, tiny_dir, data_file, smol_tok, capsys):
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, data_file, tiny_dir)
    out = tmp_path / "scores.jsonl"
    assert main(["data", "score", cfg, "--out", str(out)]) == 0
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    expected = [(line, k, s) for line, row in enumerate(TINY_ROWS, start=1)
                for k, s in enumerate(_by_hand(model, smol_tok, row["messages"]))]
    assert [(s["line"], s["turn"]) for s in scores] == [(line, k) for line, k, _ in expected]
    assert len(scores) == len(TINY_ROWS) + 1  # the last row has two trained replies
    for s, (line, _, want) in zip(scores, expected):
        assert s["row"] == f"{data_file}:{line}"
        for key in ("loss", "loss_alone", "ifd", "eot_prob"):
            assert s[key] == pytest.approx(want[key], abs=1e-4), (line, key)
    # the control: a header with one token more (SmolLM2's bos_token is <|im_start|>, once prepended
    # by mistake) moves every loss_alone by more than the tolerance
    wrong = [s for row in TINY_ROWS for s in _by_hand(model, smol_tok, row["messages"], "<|im_start|><|im_start|>assistant\n")]
    assert all(abs(s["loss_alone"] - w["loss_alone"]) > 1e-4 for s, w in zip(scores, wrong))
    assert "model scores (10 replies" in capsys.readouterr().out


def test_batching_does_not_change_scores(tmp_path, tiny_dir, data_file):
    cfg = load_config(_config(tmp_path, data_file, tiny_dir))
    _, batched = compute_scores(cfg, use_cache=False)
    _, single = compute_scores(cfg, use_cache=False, batch_tokens=1)  # one sequence per forward, no padding
    for a, b in zip(batched, single, strict=True):
        assert a["ifd"] == pytest.approx(b["ifd"], abs=1e-5) and a["eot_prob"] == pytest.approx(b["eot_prob"], abs=1e-5)


def test_scores_are_cached_and_named_by_the_scorer(tmp_path, tiny_dir, data_file, capsys):
    cfg = load_config(_config(tmp_path, data_file, tiny_dir))
    path, first = compute_scores(cfg)
    again_path, again = compute_scores(cfg)
    assert again_path == path and again == first and "scores: cached" in capsys.readouterr().err
    changed = load_config(_config(tmp_path, data_file, tiny_dir, max_length=24))  # other tokens: other scores
    assert compute_scores(changed)[0] != path


def test_reply_header_is_the_generation_prompt(smol_tok, gemma_tok):
    from sft.data.chat import resolve_template

    assert smol_tok.decode(reply_header(smol_tok, resolve_template("auto", smol_tok))) == "<|im_start|>assistant\n"
    assert gemma_tok.decode(reply_header(gemma_tok, resolve_template("gemma", gemma_tok))) == "<bos><start_of_turn>model\n"


def test_check_score_lists_the_distribution(tmp_path, tiny_dir, data_file, capsys):
    cfg = _config(tmp_path, data_file, tiny_dir)
    assert main(["data", "check", cfg, "--score"]) == 0
    text = capsys.readouterr().out
    assert "model scores (10 replies" in text and "IFD (loss given prompt / loss alone): min" in text
    assert main(["data", "check", cfg, "--score", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quality"]["scores"]["replies"] == 10


def test_train_on_all_is_refused(tmp_path, tiny_dir, data_file, capsys):
    cfg = _config(tmp_path, data_file, tiny_dir, train_on="all")
    assert main(["data", "score", cfg]) == 1
    assert "train_on: all trains the prompts too" in capsys.readouterr().err


@pytest.mark.slow  # a training run
def test_train_with_select_reads_the_cached_scores(tmp_path, tiny_dir, data_file, capsys):
    """End to end: `sft data score`, then `sft train` with data.select trains only the kept rows and
    its report says what was kept and dropped."""
    from sft.training.loop import train

    cfg_path = _config(tmp_path, data_file, tiny_dir)
    scores = [json.loads(line) for line in _score_lines(cfg_path, tmp_path)]
    per_row: dict[int, list[float]] = {}
    for s in scores:
        per_row.setdefault(s["line"], []).append(s["ifd"])
    top = sorted(per_row, key=lambda line: -sum(per_row[line]) / len(per_row[line]))[:3]  # highest mean IFD
    over = ["--data.select.keep=3", f"--output_dir={tmp_path / 'run'}", "--train.max_steps=1", "--train.precision=fp32"]
    capsys.readouterr()
    train(load_config(cfg_path, over), progress=False)
    assert "data.select: kept 3 of 9 rows by ifd" in capsys.readouterr().err
    report = (tmp_path / "run" / "report.md").read_text()
    assert "kept 3 of 9 rows by ifd; dropped: ifd_above 0, eot_below 0, not_selected 6" in report
    shown = [line.split("train.jsonl:")[1].split(" ")[0] for line in report.splitlines() if "select: kept, e.g." in line]
    assert shown == [str(line) for line in top]


def _score_lines(cfg_path: str, tmp_path) -> list[str]:
    out = tmp_path / "s.jsonl"
    assert main(["data", "score", cfg_path, "--out", str(out)]) == 0
    return out.read_text().splitlines()


@pytest.mark.slow  # starts torchrun
def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_dir, data_file):
    """Each rank scores every other row; rank 0 gathers them in input order: the file equals one process's."""
    import os
    import subprocess
    import sys

    cfg = _config(tmp_path, data_file, tiny_dir)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["data", "score", cfg, "--out", str(one)]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sft", "data", "score", cfg, "--out", str(two), "--data.cache_dir=" + str(tmp_path / "cache2")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    a = [json.loads(line) for line in one.read_text().splitlines()]
    b = [json.loads(line) for line in two.read_text().splitlines()]
    assert [(s["line"], s["turn"]) for s in b] == [(s["line"], s["turn"]) for s in a]  # all rows, in order
    for x, y in zip(a, b):
        assert y["ifd"] == pytest.approx(x["ifd"], abs=1e-5) and y["eot_prob"] == pytest.approx(x["eot_prob"], abs=1e-5)
