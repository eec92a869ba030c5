"""``data.select``: rows kept by their reply scores, in the data pipeline."""

from __future__ import annotations

import json

import pytest
import yaml

from sft.config import SelectConfig, load_config
from sft.data.pipeline import build_dataset
from sft.data.select import RowScore, choose, read_scores, row_scores
from sft.errors import SftError

# (ifd, eot_prob) of the 9 rows of conftest's data_file (row 9 has two replies)
SCORES = [(0.50, 0.90), (1.20, 0.90), (0.80, 0.01), (0.70, 0.90), (0.95, 0.90), (0.60, 0.90), (0.90, 0.90),
          (0.40, 0.90), (0.85, 0.90)]


def _write_scores(path, data_file, scores=SCORES):
    lines = [{"source": str(data_file), "line": i, "turn": 0, "ifd": ifd, "eot_prob": eot, "text": f"row {i}"}
             for i, (ifd, eot) in enumerate(scores, start=1)]
    lines.append({"source": str(data_file), "line": 9, "turn": 1, "ifd": 0.75, "eot_prob": 0.95, "text": "row 9b"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _cfg(tmp_path, data_file, select):
    body = {"model": "smollm2-135m-instruct",
            "data": {"train": [str(data_file)], "cache_dir": str(tmp_path / "cache"), "select": select}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(body))
    return load_config(str(p))


def test_select_keeps_the_top_ifd_rows_that_pass_the_thresholds(tmp_path, data_file, smol_tok):
    scores = tmp_path / "scores.jsonl"
    _write_scores(scores, data_file)
    cfg = _cfg(tmp_path, data_file, {"scores": str(scores), "keep": 3, "drop_ifd_above": 1.0, "min_eot_prob": 0.1})
    ds = build_dataset(cfg, smol_tok)
    # row 2 (ifd 1.2) and row 3 (eot 0.01) dropped; of the rest the highest mean IFD: 5 (.95), 7 (.9), 9 (.8)
    assert [ex.line for ex in ds.examples] == [5, 7, 9]
    sel = ds.report.select
    assert (sel["rows"], sel["kept"], sel["dropped"]) == (9, 3, {"ifd_above": 1, "eot_below": 1, "not_selected": 4})
    assert [e["row"].rsplit(":", 1)[1] for e in sel["kept_examples"]] == ["5", "7", "9"]
    assert [(e["row"].rsplit(":", 1)[1], e["reason"]) for e in sel["dropped_examples"]][:2] == [("2", "ifd_above"), ("3", "eot_below")]
    assert ds.report.examples == 3 and ds.report.total_tokens == sum(len(e) for e in ds.examples)
    # the control: without data.select, the same (cached) data has every row
    assert len(build_dataset(_cfg(tmp_path, data_file, None), smol_tok).examples) == 9


def test_select_fraction_and_random(tmp_path, data_file, smol_tok):
    scores = tmp_path / "scores.jsonl"
    _write_scores(scores, data_file)
    top = build_dataset(_cfg(tmp_path, data_file, {"scores": str(scores), "keep": 0.34}), smol_tok)
    assert [ex.line for ex in top.examples] == [2, 5, 7]  # round(0.34 * 9) = 3 rows; no threshold: row 2 stays
    rand = build_dataset(_cfg(tmp_path, data_file, {"scores": str(scores), "keep": 3, "by": "random"}), smol_tok)
    assert len(rand.examples) == 3 and rand.report.select["by"] == "random"


def test_choose_random_is_seeded():
    s = {("f", i): RowScore(f"f:{i}", 0.5, 0.5, 0.9, "") for i in range(20)}
    a = choose(list(s), s, SelectConfig(by="random", keep=5), seed=1)[0]
    assert a == choose(list(s), s, SelectConfig(by="random", keep=5), seed=1)[0]
    assert a != choose(list(s), s, SelectConfig(by="random", keep=5), seed=2)[0]


def test_missing_scores_say_how_to_make_them(tmp_path, data_file, smol_tok):
    with pytest.raises(SftError, match="run `sft data score CONFIG` first"):
        build_dataset(_cfg(tmp_path, data_file, {"keep": 0.5}), smol_tok)
    with pytest.raises(SftError, match="is not a file; write it with `sft data score CONFIG --out"):
        build_dataset(_cfg(tmp_path, data_file, {"scores": str(tmp_path / "none.jsonl")}), smol_tok)
    partial = tmp_path / "partial.jsonl"
    _write_scores(partial, data_file, SCORES[:7])
    with pytest.raises(SftError, match=r"1 training row\(s\) have no score .*train.jsonl:8\)"):
        build_dataset(_cfg(tmp_path, data_file, {"scores": str(partial)}), smol_tok)


def test_bad_scores_file_names_the_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"source": "a", "line": 1, "ifd": 1, "eot_prob": 1}\n{"row": "a:2"}\n')
    with pytest.raises(SftError, match=r"s.jsonl:2: not a reply score"):
        read_scores(p)


@pytest.mark.parametrize("select, message", [
    ({"keep": 1.5}, "neither a fraction in \\(0, 1\\) nor a whole number"),
    ({"keep": 0}, "neither a fraction"),
    ({"by": "random"}, "by: random needs data.select.keep"),
    ({"by": "loss"}, "'loss' is not allowed"),
    ({"keeep": 0.1}, "did you mean 'keep'"),
])
def test_select_config_errors(tmp_path, data_file, select, message):
    with pytest.raises(SftError, match=message):
        _cfg(tmp_path, data_file, select)


def test_row_scores_take_the_worst_reply():
    rows = row_scores([{"source": "a", "line": 3, "ifd": 0.2, "eot_prob": 0.9},
                       {"source": "a", "line": 3, "ifd": None, "eot_prob": None}])
    assert rows[("a", 3)].ifd == 0.2 and rows[("a", 3)].min_eot == 0.9
