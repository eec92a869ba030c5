from __future__ import annotations

import pytest

from sft.config import load_config
from sft.errors import SftError


def test_overrides_and_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: smollm2-135m-instruct\ndata:\n  train: a.jsonl\ntrain:\n  lr: 1e-5\n")
    cfg = load_config(p, ["--train.lr=1e-4", "--data.packing=false", "--train.max_steps=3"])
    assert cfg.train.lr == 1e-4 and cfg.data.packing is False and cfg.train.max_steps == 3
    assert cfg.data.train[0].path == "a.jsonl"


def test_unknown_key_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 1e-5\n")
    with pytest.raises(SftError, match=r"train.lrr: unknown key; did you mean 'lr'\?"):
        load_config(p)
    with pytest.raises(SftError, match="did you mean 'packing'"):
        load_config(None, ["--data.pakcing=true"])


def test_bad_literal_lists_choices():
    with pytest.raises(SftError, match=r"data\.train_on: 'assistants' is not allowed; did you mean 'assistant'"):
        load_config(None, ["--data.train_on=assistants"])


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: [1\n")
    with pytest.raises(SftError, match=r"c.yaml:\d+: not valid YAML"):
        load_config(p)
