from __future__ import annotations

import json
import random

import pytest

from sft.data import sources
from sft.data.sources import list_files, mix_counts, read_file, sample_rows
from sft.errors import SftError

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]


def lines_values(path):
    return [(r.line, r.value, r.error) for r in read_file(path)]


def test_jsonl_lines_blank_lines_bad_json_and_bad_bytes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        b'{"text": "a"}\n'
        b"\n"
        b'{"text": "b"\n'
        b'{"text": "caf\xe9"}\n'
        b'{"text": "d"}\n'
    )
    got = lines_values(p)
    assert got[0] == (1, {"text": "a"}, None)
    assert got[1][0] == 3 and got[1][2].startswith("not valid JSON (Expecting ',' delimiter at column 13)")
    assert got[2] == (4, None, "contains bytes that are not UTF-8 (0xe9 at byte 41 of the file); re-save the file as UTF-8")
    assert got[3] == (5, {"text": "d"}, None)


def test_json_array_tracks_the_line_where_each_record_starts(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(ROWS, indent=2))
    got = lines_values(p)
    assert [v for _, v, _ in got] == ROWS
    assert [line for line, _, _ in got] == [2, 6, 10, 14, 18]
    # compact, one line
    p.write_text(json.dumps(ROWS))
    assert [line for line, _, _ in lines_values(p)] == [1] * 5


def test_json_array_across_tiny_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK", 7)  # records and numbers split across chunks
    rows = [{"text": "x" * 20, "n": 123456789}, {"text": "y\nz"}, 12345678901234]
    p = tmp_path / "d.json"
    p.write_text("[\n" + ",\n\n".join(json.dumps(r) for r in rows) + "\n]\n")
    got = lines_values(p)
    assert got == [(2, rows[0], None), (4, rows[1], None), (6, rows[2], None)]


def test_json_errors_report_their_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": "b",\n   "x": }\n]\n')
    got = lines_values(p)
    assert got[0] == (2, {"text": "a"}, None)
    assert got[1][0] == 4 and "not valid JSON (Expecting value at column 9)" in got[1][2]
    p.write_bytes(b'[{"text": "a"},\n{"text": "\xff"}]')
    assert lines_values(p)[1] == (2, None, "contains bytes that are not UTF-8 (0xff at byte 26 of the file); re-save the file as UTF-8")
    p.write_text('[{"text": "a"}')
    assert lines_values(p)[1] == (1, None, "the JSON array is not closed; end the file with ]")


def test_json_file_of_concatenated_objects(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert lines_values(p) == [(1, {"text": "a"}, None), (2, {"text": "b"}, None)]


def test_csv_header_is_line_one_and_multiline_cells(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('instruction,output\nq1,a1\n"q2\nmore",a2\nq3,a3,extra\nq4,a4\n')
    got = lines_values(p)
    assert got[0] == (2, {"instruction": "q1", "output": "a1"}, None)
    assert got[1] == (3, {"instruction": "q2\nmore", "output": "a2"}, None)
    assert got[2][0] == 5 and "more cells than the header" in got[2][2]
    assert got[3] == (6, {"instruction": "q4", "output": "a4"}, None)


def test_parquet_rows_are_numbered(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p, row_group_size=2)
    got = lines_values(p)
    assert [line for line, _, _ in got] == [1, 2, 3, 4, 5]
    assert [v for _, v, _ in got] == ROWS


def test_list_files(tmp_path):
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "a.json").write_text("[]")
    (tmp_path / "notes.txt").write_text("")
    assert [p.name for p in list_files(tmp_path)] == ["a.json", "b.jsonl"]
    with pytest.raises(SftError, match="data file not found"):
        list_files(tmp_path / "missing.jsonl")
    with pytest.raises(SftError, match="unsupported file type"):
        list_files(tmp_path / "notes.txt")


def test_mix_and_sample():
    assert mix_counts([10, 30], [None, None]) == [10, 30]
    assert mix_counts([10, 30], [1.0, 1.0]) == [20, 20]
    assert mix_counts([10, 30], [1.0, None]) == [20, 20]
    rows = sample_rows(10, 20, random.Random(0))
    assert len(rows) == 20 and set(rows) == set(range(10))
    assert sample_rows(10, 3, random.Random(0)) == sorted(sample_rows(10, 3, random.Random(0)))
    assert sample_rows(10, 3, random.Random(0)) != sample_rows(10, 3, random.Random(1))
