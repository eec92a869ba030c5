"""Data quality (sft.data.quality): planted problems are found at their file and line, clean rows
are left alone, and data.quality.drop removes exactly the named kinds."""

from __future__ import annotations

import io
import json
import random

import pytest

from sft.config import load_config
from sft.data import commands
from sft.data.pipeline import build_dataset
from sft.data.quality import (
    KINDS,
    QualitySettings,
    contamination,
    find_problems,
    length_outliers,
    near_duplicates,
    rows_to_drop,
)
from sft.data.replies import empty_reason, placeholder_reason, placeholders, truncation_reason
from sft.data.types import Conversation, Message
from sft.errors import SftError

# ---------------------------------------------------------------------------------------------
# a generated set with planted problems


def _vocab(rng: random.Random, n: int = 3000) -> list[str]:
    syl = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "qui", "dan", "po", "ny", "ber", "ho", "zi", "ma"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syl) for _ in range(rng.randint(2, 3))))
    return sorted(words)


class Gen:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.words = _vocab(self.rng)

    def sentence(self, end: str = ".") -> str:
        w = self.rng.sample(self.words, self.rng.randint(7, 12))
        return " ".join(w).capitalize() + end

    def reply(self, sentences: int | None = None) -> str:
        return " ".join(self.sentence() for _ in range(sentences or self.rng.randint(2, 4)))

    def row(self, prompt: str | None = None, reply: str | None = None, system: str | None = None, **extra):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt or self.sentence("?")},
            {"role": "assistant", "content": reply or self.reply()},
        ]
        return {"messages": msgs, **extra}


def planted(tmp_path):
    """train.jsonl (~200 rows) and eval.jsonl (20 rows); returns (paths, planted locations by kind,
    clean train lines, near-duplicate originals, contamination train lines)."""
    g = Gen()
    train: list[dict] = [g.row(reply=g.reply(3)) for _ in range(180)]
    kinds: dict[str, list[int]] = {k: [] for k in KINDS}  # 1-based train lines (eval lines for contamination)
    originals: dict[int, int] = {}  # near-duplicate line -> original line

    def add(kind: str, row: dict) -> int:
        train.append(row)
        kinds[kind].append(len(train))
        return len(train)

    for k in (3, 17, 40, 88, 120):  # one word of the reply changed
        src = train[k]["messages"]
        words = src[1]["content"].split()
        words[len(words) // 2] = "zzzchanged"
        line = add("near_duplicates", {"messages": [src[0], {"role": "assistant", "content": " ".join(words)}]})
        originals[line] = k + 1
    for reply in ("...", "N/A", "  -  "):
        add("empty_responses", g.row(reply=reply))
    add("truncated_responses", g.row(reply=g.reply(2) + " Then the most important part of the"))
    add("truncated_responses", g.row(reply="Here is the code:\n```python\nprint('hello')"))
    add("truncated_responses", g.row(system="Answer with a JSON object.", reply='{"answer": "kalo", "items": [1, 2'))
    add("truncated_responses", g.row(reply=g.sentence() + " The list (kalo, mire and tusa"))
    add("boilerplate", g.row(reply="As an AI language model, I cannot know. " + g.sentence()))
    add("boilerplate", g.row(reply="I'm sorry, but I can't help with that."))
    add("boilerplate", g.row(reply="Certainly! Here is the answer. " + g.sentence()))  # data.quality.boilerplate
    add("length_outliers", g.row(reply=g.reply(60)))
    add("length_outliers", g.row(reply="Yes."))
    add("placeholders", g.row(prompt="Who are you?", reply="I am {{name}}, an AI assistant developed by {{author}}. "
                              + g.reply(2)))
    add("placeholders", g.row(reply=g.reply(2) + " Ask [Your Name] at the desk."))
    refusal = "I'm sorry, but I can't help with that. " + g.reply(2)
    train.append(g.row(reply=refusal, category="harmful"))  # a lesson, not boilerplate
    # not placeholders: template code in a fence, a placeholder in the prompt only, a letter's signature slot
    train.append(g.row(reply=g.reply(2) + " In Jinja:\n```jinja\nHello {{ name }}!\n```\nIt prints the name."))
    train.append(g.row(prompt="Greet {{name}} warmly?", reply=g.reply(3)))
    train.append(g.row(reply="Dear team,\n" + g.reply(2) + "\nBest regards,\n[Your Name]"))
    # shuffle the planted rows among the clean ones would change their lines; keep them last but
    # move five clean rows after them so problems are not simply "the tail"
    train += [g.row(reply=g.reply(3)) for _ in range(5)]

    ev = [g.row(reply=g.reply(2)) for _ in range(17)]
    contaminated: dict[int, int] = {}  # eval line -> train line
    ev.append(g.row(reply=train[10]["messages"][1]["content"]))  # reply copied, prompt new
    contaminated[len(ev)] = 11
    ev.append(g.row(prompt=train[50]["messages"][0]["content"]))  # prompt copied, reply new
    contaminated[len(ev)] = 51
    part = train[70]["messages"][1]["content"].split()
    ev.append(g.row(reply=" ".join(part[: int(len(part) * 0.8)]) + " " + g.sentence()))  # 80% of a reply
    contaminated[len(ev)] = 71
    ev.append(g.row())
    kinds["contamination"] = sorted(contaminated)

    tp, ep = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    tp.write_text("".join(json.dumps(r) + "\n" for r in train))
    ep.write_text("".join(json.dumps(r) + "\n" for r in ev))
    flagged = {line for k, lines in kinds.items() if k != "contamination" for line in lines}
    clean = [i + 1 for i in range(len(train)) if i + 1 not in flagged]
    return tp, ep, kinds, clean, originals, contaminated


@pytest.fixture()
def no_weights(monkeypatch, smol_tok):
    import sft.models.load

    def boom(*a, **k):
        raise AssertionError("sft data loaded model weights")

    monkeypatch.setattr(sft.models.load, "load_model", boom)
    monkeypatch.setattr(sft.models.load, "load_tokenizer", lambda name, trust_remote_code=False, **kw: smol_tok)


def _config(tmp_path, quality: str = "", eval_data: bool = True):
    (tmp_path / "c.yaml").write_text(
        "model: smollm2-135m-instruct\n"
        f"data:\n  train: [train.jsonl]\n  cache_dir: {tmp_path / 'cache'}\n  max_length: 4096\n"
        "  quality:\n    boilerplate: ['certainly! here is']\n" + quality
        + ("eval:\n  data: [eval.jsonl]\n" if eval_data else "")
    )
    return load_config(tmp_path / "c.yaml")


def _check_json(cfg) -> dict:
    out = io.StringIO()
    assert commands.check(cfg, as_json=True, stream=out) == 0
    return json.loads(out.getvalue())


def test_planted_problems_found_at_their_lines_and_clean_rows_left_alone(tmp_path, no_weights):
    tp, ep, kinds, clean, originals, contaminated = planted(tmp_path)
    q = _check_json(_config(tmp_path))["quality"]
    assert list(q) == list(KINDS)  # the public JSON: exactly these keys, in this order
    train, ev = str(tp), str(ep)

    for kind in ("empty_responses", "truncated_responses", "boilerplate", "placeholders", "length_outliers"):
        for item in q[kind]:
            assert set(item) == {"file", "line", "why"} and item["file"] == train and item["why"]
        found = {item["line"] for item in q[kind]}
        assert set(kinds[kind]) <= found, (kind, sorted(set(kinds[kind]) - found), q[kind])

    dups = {d["line"]: d for d in q["near_duplicates"]}
    for line, original in originals.items():
        d = dups[line]
        assert set(d) == {"file", "line", "duplicate_of", "similarity"} and d["file"] == train
        assert d["duplicate_of"] == {"file": train, "line": original}
        assert 0.8 <= d["similarity"] < 1.0

    cont = {c["eval"]["line"]: c for c in q["contamination"]}
    assert set(cont) == set(contaminated)  # and no clean eval row
    for line, train_line in contaminated.items():
        c = cont[line]
        assert set(c) == {"eval", "train", "overlap"} and c["eval"] == {"file": ev, "line": line}
        assert c["train"] == {"file": train, "line": train_line} and 0.5 <= c["overlap"] <= 1.0
    assert cont[kinds["contamination"][0]]["overlap"] == 1.0

    flagged_clean = set(clean) & ({i["line"] for k in KINDS if k != "contamination" for i in q[k]}
                                  | {c["train"]["line"] for c in q["contamination"]} - set(contaminated.values()))
    assert len(flagged_clean) <= len(clean) / 20, sorted(flagged_clean)  # the issue's bar
    assert flagged_clean == set()  # what this set shows (README)
    assert len(clean) > 170


def test_control_threshold_one_finds_no_near_duplicates(tmp_path, no_weights):
    planted(tmp_path)
    cfg = _config(tmp_path, quality="    near_duplicate_threshold: 1.0\n")
    assert _check_json(cfg)["quality"]["near_duplicates"] == []
    cfg = _config(tmp_path, quality="    near_duplicate_threshold: 0.8\n")  # the same data at 0.8: found
    assert len(_check_json(cfg)["quality"]["near_duplicates"]) == 5


def test_no_eval_data_no_contamination_and_human_table(tmp_path, no_weights):
    tp, _, kinds, *_ = planted(tmp_path)
    cfg = _config(tmp_path, eval_data=False)
    out = io.StringIO()
    assert commands.check(cfg, stream=out) == 0
    text = out.getvalue()
    assert "quality:" in text
    assert "  near_duplicates          5" in text and "  contamination            0" in text
    assert f"train.jsonl:{kinds['empty_responses'][0]}: messages[1] (assistant) has no words: '...'" in text
    assert "... 1 more (--json lists all)" in text  # 4 truncated: 3 shown
    first, second = kinds["placeholders"]
    assert ("  placeholders             2\n"
            f"    {tp}:{first}: messages[1] (assistant) has the unfilled placeholder \"{{{{name}}}}\" "
            "(and 1 more: \"{{author}}\")\n"
            f"    {tp}:{second}: messages[1] (assistant) has the unfilled placeholder \"[Your Name]\"\n"
            "    fill them in (e.g. replace {{name}} with your assistant's name) or drop the rows: "
            "data.quality.drop: [placeholders]\n"
            "  length_outliers") in text
    assert text.count("fill them in") == 1  # the hint is said under its kind only


def test_drop_removes_the_named_kinds_and_says_how_many(tmp_path, no_weights, smol_tok, capsys):
    _, _, kinds, _, originals, contaminated = planted(tmp_path)
    keep = build_dataset(_config(tmp_path), smol_tok)
    assert keep.report.quality_dropped == {} and keep.report.quality_counts["near_duplicates"] == 5
    cfg = _config(tmp_path, quality="    drop: [near_duplicates, empty_responses, contamination]\n")
    ds = build_dataset(cfg, smol_tok)
    assert ds.report.quality_dropped == {"near_duplicates": 5, "empty_responses": 3, "contamination": 3}
    gone = set(originals) | set(kinds["empty_responses"]) | set(contaminated.values())
    assert {e.line for e in keep.examples} - {e.line for e in ds.examples} == gone
    assert ds.report.examples == keep.report.examples - 11 == len(ds.examples)
    assert ds.report.total_tokens == sum(len(e) for e in ds.examples)
    assert "data.quality.drop: removed 11 rows (near_duplicates 5, empty_responses 3, contamination 3)" in \
        capsys.readouterr().err
    cached = build_dataset(cfg, smol_tok)  # from the cache: same rows, same findings
    assert cached.report.cached and [e.line for e in cached.examples] == [e.line for e in ds.examples]
    assert cached.quality == ds.quality


def test_drop_placeholders_removes_exactly_those_rows(tmp_path, no_weights, smol_tok):
    _, _, kinds, *_ = planted(tmp_path)
    keep = build_dataset(_config(tmp_path), smol_tok)
    assert keep.report.quality_counts["placeholders"] == 2 and keep.report.quality_dropped == {}
    ds = build_dataset(_config(tmp_path, quality="    drop: [placeholders]\n"), smol_tok)
    assert ds.report.quality_dropped == {"placeholders": 2}
    assert {e.line for e in keep.examples} - {e.line for e in ds.examples} == set(kinds["placeholders"])
    assert ds.report.examples == keep.report.examples - 2 == len(ds.examples)
    # still found (the check reports what is there), and the text no longer suggests dropping them
    out = io.StringIO()
    assert commands.check(_config(tmp_path, quality="    drop: [placeholders]\n"), stream=out) == 0
    assert "  placeholders             2  (2 rows dropped by data.quality.drop)" in out.getvalue()
    assert "fill them in" not in out.getvalue()


def test_drop_key_is_checked():
    with pytest.raises(SftError, match=r"data.quality.drop\[0\]: 'near_duplicate' is not allowed; did you mean "
                                       r"'near_duplicates'"):
        load_config(None, ["--data.quality.drop=[near_duplicate]"])
    with pytest.raises(SftError, match=r"near_duplicate_threshold: 1.5 must be in"):
        load_config(None, ["--data.quality.near_duplicate_threshold=1.5"])
    assert load_config(None).data.quality.near_duplicate_threshold == 0.8
    with pytest.raises(SftError, match=r"'placeholder' is not allowed; did you mean 'placeholders'"):
        load_config(None, ["--data.quality.drop=[placeholder]"])
    assert load_config(None, ["--data.quality.drop=[placeholders]"]).data.quality.drop == ["placeholders"]


# ---------------------------------------------------------------------------------------------
# the pieces


def conv(reply: str, prompt: str = "q", system: str | None = None, line: int = 1, **kw) -> Conversation:
    msgs = ([Message("system", system)] if system else []) + [Message("user", prompt), Message("assistant", reply)]
    return Conversation(msgs, source="t.jsonl", line=line, **kw)


@pytest.mark.parametrize(("reply", "system", "why"), [
    ("It is finished and ready to use with", None, "ends on 'with'"),
    ("First, mix the flour,", None, "ends on ','"),
    ("Steps:\n```bash\nls -la\n", None, "unclosed ``` code fence"),
    ('{"answer": 3', "Reply in JSON only.", "system prompt asks for JSON"),
    ("See the table [row 1, row 2", None, "unclosed '['"),
])
def test_truncated(reply, system, why):
    assert why in truncation_reason(conv(reply, system=system))


@pytest.mark.parametrize(("reply", "system"), [
    ("It is 4.", None),
    ("Paris", None),  # short answers need no full stop
    ("1) mix 2) bake 3) eat", None),  # stray closers are not unclosed brackets
    ("```python\nprint(1)\n```", None),
    ('{"answer": 3}', "Reply in JSON only."),
    ('```json\n{"answer": 3}\n```', "Reply in JSON only."),
    ("Use a wide, flat pan: it heats evenly", None),
])
def test_not_truncated(reply, system):
    assert truncation_reason(conv(reply, system=system)) is None


def test_cut_at_max_length_and_length_limit():
    assert "data.max_length" in truncation_reason(conv("Fine."), cut=True)
    rows = [conv(f"word {i} " * 5 + "end", line=i) for i in range(10)]  # no full stops
    lengths = {("t.jsonl", i): (50 if i < 4 else 20 + i) for i in range(10)}
    found = find_problems(rows, lengths=lengths)["truncated_responses"]
    assert [f["line"] for f in found] == [0, 1, 2, 3] and "length limit" in found[0]["why"]
    lengths[("t.jsonl", 3)] = 49  # only three rows at the longest length: no longer a limit
    lengths[("t.jsonl", 2)] = 48
    assert find_problems(rows, lengths=lengths)["truncated_responses"] == []


def test_empty():
    assert "no words" in empty_reason(conv(" ... "))
    assert "placeholder" in empty_reason(conv("N/A"))
    assert empty_reason(conv("0")) is None and empty_reason(conv("No.")) is None
    tool = Conversation([Message("user", "q"), Message("assistant", "", tool_calls=[{"type": "function"}])])
    assert empty_reason(tool) is None


def test_boilerplate_refusals_allowed_where_the_row_is_harmful():
    refusal = "I'm sorry, but I can't help with that."
    assert find_problems([conv(refusal)])["boilerplate"][0]["why"] == \
        """messages[1] (assistant) says "i can't help with\""""
    assert find_problems([conv(refusal, category="harmful")])["boilerplate"] == []
    ai = "As an AI language model, I have no view."
    assert find_problems([conv(ai, category="harmful")])["boilerplate"] != []  # self-reference still is
    custom = find_problems([conv("Great question! It is 4.")], settings=QualitySettings(boilerplate=("Great QUESTION",)))
    assert custom["boilerplate"][0]["why"].endswith('"great question"')


UNFILLED = 'messages[1] (assistant) has the unfilled placeholder '


@pytest.mark.parametrize(("reply", "why"), [
    ("I am {{name}}, an AI assistant.", UNFILLED + '"{{name}}"'),
    ("I am {{ name }}.", UNFILLED + '"{{ name }}"'),
    ("Hi, I'm {{name}}, made by {{author}}. Ask {{name}} anything.", UNFILLED + '"{{name}}" (and 1 more: "{{author}}")'),
    ("Thanks for writing. Regards, [Your Name]", UNFILLED + '"[Your Name]"'),
    ("The meeting is on <insert date> at noon.", UNFILLED + '"<insert date>"'),
    ("Hello from {{ user.first_name }}!", UNFILLED + '"{{ user.first_name }}"'),
    ("我是{{name}}，由{{author}}开发。", UNFILLED + '"{{name}}" (and 1 more: "{{author}}")'),  # no space before
    ("<YOUR NAME> of [Insert Company] says {{a}}, {{b}} and {{c}}.",
     UNFILLED + '"<YOUR NAME>" (and 4 more: "[Insert Company]", "{{a}}", "{{b}}", ...)'),
])
def test_placeholders(reply, why):
    found = find_problems([conv(reply, line=4), conv("It is 4.", line=5)])["placeholders"]
    assert found == [{"file": "t.jsonl", "line": 4, "why": why}]


@pytest.mark.parametrize("reply", [
    "In Jinja:\n```jinja\nHello {{ name }}!\n```\nIt prints the name.",  # fenced code
    "In Jinja, `{{ name }}` prints the name.",  # inline code
    "Use {{ x | upper }} to upper-case x, {{#each items}} to loop and {{{raw}}} to skip escaping.",  # not a bare name
    "As shown in [1] and [2], it works.<br>Yes.",  # citations, HTML
    "Open [your account settings](https://example.com/settings) and save.",  # a Markdown link
    "Dear Ann,\nThe webinar is on Monday.\nBest regards,\n[Your Name]",  # a letter's signature slot
    "Date: [insert date]\nTime: [insert time]\nIssue: [insert brief description]",  # a form, as asked
    "See [insert a long description of the whole issue here].",  # too long for a fill-in
    "The square is $x^{{2}}$ and the half is $\\frac{{x}}{2}$.",  # TeX
    "Yes.",
])
def test_control_not_placeholders(reply):
    assert placeholder_reason(conv(reply)) is None, placeholders(reply)


def test_placeholders_only_in_trained_reply_text():
    assert placeholder_reason(conv("Hello, Ann.", prompt="Say hi to {{name}}.")) is None  # the prompt may template
    assert placeholder_reason(conv("Hello, {{name}}.", prompt="Say hi to {{name}}.")) is not None  # control
    untrained = Conversation([Message("user", "q"), Message("assistant", "I am {{name}}.", train=False),
                              Message("user", "q2"), Message("assistant", "Fine.")])
    assert placeholder_reason(untrained) is None
    thought = Conversation([Message("user", "q"), Message("assistant", "Fine.", reasoning="I am {{name}}.")])
    assert placeholder_reason(thought) == 'messages[1] (assistant) reasoning has the unfilled placeholder "{{name}}"'
    call = Conversation([Message("user", "q"), Message("assistant", "", tool_calls=[
        {"type": "function", "function": {"name": "greet", "arguments": {"who": "{{name}}"}}}])])
    assert placeholder_reason(call) is None  # tool-call arguments are not reply text
    text = Conversation([Message("assistant", "Dear {{name}}, welcome.")], "t.jsonl", 1, is_text=True)
    assert find_problems([text])["placeholders"] == []  # a document, not a reply


def test_exact_duplicates_are_near_duplicates_with_similarity_one():
    rows = [conv("The cat sat on the mat today.", line=i) for i in (1, 2)] + [conv("A different reply here.", line=3)]
    assert near_duplicates(rows) == [{"file": "t.jsonl", "line": 2, "duplicate_of": {"file": "t.jsonl", "line": 1},
                                      "similarity": 1.0}]


def test_near_duplicates_ignore_system_prompts():
    """Rows sharing a long system prompt but answering different questions are not duplicates."""
    sys = "You are a careful assistant. " * 30
    rows = [conv(f"Answer number {i} is {i * 7} apples.", prompt=f"How many apples in box {i}?", system=sys, line=i)
            for i in range(5)]
    assert near_duplicates(rows) == []


def test_contamination_short_texts_match_exactly_only():
    train = [conv("My name is Quill.", prompt="What are you called?", line=1)]
    same = conv("My name is Quill.", prompt="Tell me your name.", line=7)
    longer = conv("My name is Quill and I like tea.", prompt="Tell me your name.", line=8)
    tiny = conv("Yes.", prompt="OK?", line=9)
    found = contamination([same, longer, tiny], [*train, conv("Yes.", prompt="OK?", line=2)])
    assert found == [{"eval": {"file": "t.jsonl", "line": 7}, "train": {"file": "t.jsonl", "line": 1}, "overlap": 1.0}]


def test_length_outliers_both_sides_and_none_in_a_tight_set():
    rows = [conv("x", line=i) for i in range(30)]
    lengths = {("t.jsonl", i): 40 + i % 7 for i in range(30)}
    assert length_outliers(rows, lengths) == []
    lengths[("t.jsonl", 3)], lengths[("t.jsonl", 5)] = 900, 2
    found = length_outliers(rows, lengths)
    assert [(f["line"], f["why"].split(": ")[-1]) for f in found] == [(3, "too long"), (5, "too short")]
    assert found[0]["why"].startswith("900 trained tokens, robust z +")


def test_rows_to_drop_uses_the_train_side_of_contamination():
    found = find_problems([conv("Same words in this reply today.", line=1), conv("Same words in this reply today.", line=2)],
                          [conv("Same words in this reply today.", line=5)])
    assert rows_to_drop(found, ["contamination"]) == {("t.jsonl", 1): "contamination"}
    assert rows_to_drop(found, ["near_duplicates"]) == {("t.jsonl", 2): "near_duplicates"}
    assert rows_to_drop(found, []) == {}


def test_category_per_row_and_per_source(tmp_path):
    from sft.data.pipeline import collect_conversations

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "category": c}
            for c in ("harmful", None)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))
    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "category": "evil"}) + "\n")
    cfg = load_config(None, [f"--data.train=[{{path: {tmp_path / 't.jsonl'}, category: benign}}]"])
    convs, _ = collect_conversations(cfg)
    assert [c.category for c in convs] == ["harmful", "benign"]  # the row's own wins
    cfg = load_config(None, [f"--data.train=[{tmp_path / 'bad.jsonl'}]"])
    _, report = collect_conversations(cfg)
    assert report.invalid[0]["error"] == 'category is \'evil\'; use "harmful" or "benign" (or leave the key out)'
    with pytest.raises(SftError, match=r"data.train\[0\].category: 'evil' is not a valid value; expected 'harmful' \| 'benign'"):
        load_config(None, ["--data.train=[{path: x.jsonl, category: evil}]"])


def test_run_report_has_a_quality_line(tmp_path):
    from sft.data.pipeline import DataReport
    from sft.reporting.report import write_report

    r = DataReport(quality_counts={"near_duplicates": 2, "contamination": 0}, quality_dropped={"near_duplicates": 2})
    _, md = write_report(tmp_path, {"model": "m"}, [], None, None, r.to_dict())
    text = md.read_text()
    assert "| quality (sft data check) | near_duplicates 2 (2 dropped), contamination 0 |" in text
    assert "quality_dropped" not in text
