"""``sft ui`` through Starlette's test client, over run folders written here the way ``sft train``
writes them: statuses, escaping, path traversal, a torn metrics file, compare, data preview."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml
from starlette.testclient import TestClient

from sft.cli import build_parser
from sft.ui import runs as R
from sft.ui import server

EVIL = "<script>alert('x')</script>"


def write_run(d: Path, steps: int = 3, lr: float = 1e-3, finished: bool = True, checkpoint: int | None = None,
              age_s: float = 0.0, extra_rows: str = "", before: dict | None = None, after: dict | None = None) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "output_dir": str(d),
                                                   "data": {"train": [{"path": "train.jsonl"}]},
                                                   "train": {"lr": lr, "seed": 1}}))
    rows = [{"step": s, "loss": round(3.0 - 0.5 * s, 3), "lr": lr, "grad_norm": 1.0, "tokens": 100,
             "trained_tokens": 40, "elapsed_s": 0.5 * s} for s in range(1, steps + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra_rows)
    if finished:
        (d / "run_state.json").write_text(json.dumps({"status": "finished", "steps": steps}))
    if checkpoint is not None:
        (d / "checkpoints" / f"step-{checkpoint}").mkdir(parents=True)
    for name, result in (("before.json", before), ("after.json", after)):
        if result is not None:
            (d / name).write_text(json.dumps(result))
    if age_s:
        old = time.time() - age_s
        for p in d.rglob("*"):
            os.utime(p, (old, old))
    return d


def client(root: Path) -> TestClient:
    return TestClient(server.make_app(root))


def test_runs_page_lists_every_run_with_its_status(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "done", before={"eval_loss": 2.5, "task_accuracy": 0.25},
              after={"eval_loss": 1.5, "task_accuracy": 0.75, "forgetting": {"reference_perplexity": 12.5},
                     "intervals": {"task_accuracy": [0.5, 0.875], "forgetting": {"reference_perplexity": [11.0, 14.0]}}})
    write_run(root / "live", finished=False)
    write_run(root / "stopped", finished=False, checkpoint=3, age_s=600)
    write_run(root / "crashed", finished=False, checkpoint=2, age_s=600)
    write_run(root / "sw" / "trials" / "lr-0.1", lr=0.1, extra_rows='{"step": 3, "dev_loss": 1.75}\n')
    c = client(root)
    got = {r["id"]: r for r in c.get("/api/runs").json()}
    assert {k: v["status"] for k, v in got.items()} == {
        "crashed": "failed", "done": "finished", "live": "running", "stopped": "interrupted", "sw/trials/lr-0.1": "finished"}
    assert got["sw/trials/lr-0.1"]["eval_loss"] == 1.75 and got["done"]["eval_loss"] is None  # dev_loss counts too
    assert got["done"]["loss"] == 1.5 and got["done"]["step"] == 3 and got["done"]["tokens_per_s"] == 200.0
    assert got["done"]["before"]["task_accuracy"] == 0.25 and got["done"]["after"]["eval_loss"] == 1.5
    assert got["sw/trials/lr-0.1"]["sweep"] == "sw" and got["done"]["sweep"] is None
    html = c.get("/").text
    assert '<span class="status interrupted">interrupted</span>' in html
    assert "2.5 → 1.5" in html and "0.25 → 0.75" in html
    assert 'href="/compare?sweep=sw"' in html
    run = c.get("/run", params={"id": "done"}).text  # before/after with the intervals the eval computed
    assert "<tr><td>task_accuracy</td><td>0.25</td><td>0.75</td>\n<td></td><td>[0.5, 0.875]</td></tr>" in run
    assert "<td>reference_perplexity</td><td>–</td><td>12.5</td>\n<td></td><td>[11, 14]</td>" in run


def test_running_allows_for_slow_steps_and_a_slow_start(tmp_path):
    """A run counts as running while it has written within 3 x its slowest step (at least 2 min),
    or within 10 min before its first step; after that, without a checkpoint, it failed."""
    def at(name: str, steps: int, age_s: float) -> str:
        run = write_run(tmp_path / name, steps=steps, finished=False, age_s=age_s)
        if steps:  # steps 200 s apart, as a big model on a CPU
            rows = [{"step": s, "loss": 1.0, "tokens": 10, "elapsed_s": 200.0 * s} for s in range(1, steps + 1)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            old = time.time() - age_s
            os.utime(run / "metrics.jsonl", (old, old))
        return R.status(run, R.read_metrics(run / "metrics.jsonl")[0])

    assert [at("slow-a", 2, 500), at("slow-b", 2, 700)] == ["running", "failed"]
    assert [at("start-a", 0, 500), at("start-b", 0, 700)] == ["running", "failed"]


def test_user_text_is_escaped_everywhere(tmp_path):
    root = tmp_path / "runs"
    sample = {"prompt": f"say {EVIL}", "reference": EVIL, "reply": EVIL, "correct": False, "stopped": True}
    run = write_run(root / "evil", before={"eval_loss": 2.0, "samples": [sample]},
                    after={"eval_loss": 1.0, "samples": [sample]})
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = EVIL
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "trial.json").write_text(json.dumps({"params": {"note": EVIL}}))
    write_run(root / "other")
    c = client(root)
    pages = [c.get("/").text, c.get("/run", params={"id": "evil"}).text,
             c.get("/compare", params=[("id", "evil"), ("id", "other")]).text]
    for html in pages:
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(" in html  # the text is there, as text
    assert c.get("/run", params={"id": "evil"}).text.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") >= 5
    # a run folder whose name is markup
    write_run(root / '<img src=x onerror="alert(1)">')
    html = c.get("/").text
    assert "<img src=x" not in html and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


def test_control_the_same_page_without_autoescape_would_inject(tmp_path):
    """The escaping test can fail: rendered without autoescape, the reply becomes a script tag."""
    from jinja2 import Environment, FileSystemLoader

    env = Environment(loader=FileSystemLoader(server.HERE / "templates"), autoescape=False)
    env.filters["fmt"], env.filters["interval"] = server._fmt, R.interval_text
    sample = {"prompt": "p", "reference": "r", "reply": EVIL, "correct": False, "stopped": True}
    html = env.get_template("run.html").render(run={"id": "x", "data": [], "problems": []}, config_text="",
                                               data=None, table=[], forgetting=[],
                                               samples=server.sample_pairs(None, {"samples": [sample]}))
    assert EVIL in html


def test_paths_outside_the_runs_dir_are_refused(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "ok")
    write_run(tmp_path / "secret", lr=0.777)  # a real run, next to the runs dir
    (root / "link").symlink_to(tmp_path / "secret")
    c = client(root)
    assert c.get("/run", params={"id": "ok"}).status_code == 200
    for rid in ["../secret", str(tmp_path / "secret"), "link", "ok/../../secret", "..", "ok/../..", "nothing", "ok\x00"]:
        for url in ("/run", "/api/metrics", "/data"):
            r = c.get(url, params={"id": rid})
            assert r.status_code == 404, (url, rid)
            assert "0.777" not in r.text  # nothing of the secret run's config or metrics
    for url in ("/compare?id=ok&id=../secret", "/static/../runs.py", "/static/%2e%2e/runs.py", "/static/..%2fserver.py"):
        assert c.get(url).status_code == 404, url
    assert [r["id"] for r in c.get("/api/runs").json()] == ["ok"]  # the symlinked run is not listed


def test_a_torn_or_malformed_metrics_file_shows_what_can_be_read(tmp_path):
    root = tmp_path / "runs"
    run = write_run(root / "torn", finished=False, extra_rows='garbage{\n{"step": 4, "loss": 1.2')
    c = client(root)
    assert c.get("/").status_code == 200
    page = c.get("/run", params={"id": "torn"})
    assert page.status_code == 200 and "line 4: not a JSON object" in page.text
    first = c.get("/api/metrics", params={"id": "torn"}).json()
    assert [r["step"] for r in first["rows"]] == [1, 2, 3] and first["problems"] == ["line 4: not a JSON object"]
    with (run / "metrics.jsonl").open("a") as f:  # the writer finishes the line
        f.write(', "lr": 0.001}\n')
    more = c.get("/api/metrics", params={"id": "torn", "offset": first["offset"]}).json()
    assert more["rows"] == [{"step": 4, "loss": 1.2, "lr": 0.001}] and more["problems"] == []
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00[1, 2]\n{}\n")  # binary junk, a list, a row without step
    r = c.get("/api/metrics", params={"id": "torn"})
    assert r.status_code == 200 and r.json()["rows"] == [] and len(r.json()["problems"]) == 2
    assert c.get("/run", params={"id": "torn"}).status_code == 200
    (run / "config.yaml").write_text("model: [unclosed")
    (run / "run_state.json").write_text("{")
    assert c.get("/").status_code == 200 and c.get("/run", params={"id": "torn"}).status_code == 200


def test_compare_two_runs_and_a_sweep(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a", lr=1e-3, after={"eval_loss": 1.5, "task_accuracy": 0.5})
    write_run(root / "b", lr=1e-4, after={"eval_loss": 1.25, "task_accuracy": 0.75})
    write_run(root / "sw" / "trials" / "t1", lr=0.1)
    write_run(root / "sw" / "trials" / "t2", lr=0.2)
    c = client(root)
    html = c.get("/compare", params=[("id", "a"), ("id", "b")]).text
    assert '<tr class="differs"><td>train.lr</td><td>0.001</td><td>0.0001</td></tr>' in html
    assert '<tr class="same"><td>train.seed</td><td>1</td><td>1</td></tr>' in html
    assert "<td>task_accuracy</td><td>0.5" in html and "<td>0.75" in html
    assert 'data-runs="[&#34;a&#34;, &#34;b&#34;]"' in html
    (root / "sw" / "sweep.json").write_text(json.dumps({"chosen": "t1", "verdicts": {"t1": "chosen: best <eval_loss>"}}))
    sweep = c.get("/compare", params={"sweep": "sw"}).text
    assert '<td class="verdict">chosen: best &lt;eval_loss&gt;</td>' in sweep
    assert 'data-runs="[&#34;sw/trials/t1&#34;, &#34;sw/trials/t2&#34;]"' in sweep
    assert "<td>train.lr</td><td>0.1</td><td>0.2</td>" in sweep


def data_run(tmp_path, model, data_file, **data_keys):
    """A runs folder with one run "r" whose config trains ``model`` on ``data_file``; its client."""
    root = tmp_path / "runs"
    run = write_run(root / "r")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(model=str(model), data={"train": [{"path": str(data_file)}], "max_length": 128, **data_keys})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return client(root)


def test_data_page_previews_trained_tokens_searchable_by_file_line(tmp_path, tiny_dir, data_file):
    c = data_run(tmp_path, tiny_dir, data_file)
    html = c.get("/data", params={"id": "r", "q": f"{data_file.name}:3"}).text
    assert "1 of 9 conversations match" in html
    assert f"{data_file}:3: " in html
    assert '<span class="trained">5 plus 6 is 11. Indeed.&lt;|im_end|&gt;</span>' in html
    assert '<span class="masked">' in html and "What is 5 plus 6?" in html
    everything = c.get("/data", params={"id": "r"}).text
    assert "9 of 9 conversations match" in everything and everything.count('<section class="example">') == 9


def test_data_page_finds_rows_by_their_text(tmp_path, tiny_dir, data_file):
    """A query that is not file:line searches the conversations' text, case-insensitively (it
    searched "Row(file:line)", the lazy row's repr, so no text ever matched)."""
    c = data_run(tmp_path, tiny_dir, data_file)
    html = c.get("/data", params={"id": "r", "q": "WHAT IS 5 PLUS"}).text
    assert "1 of 9 conversations match" in html and f"{data_file}:3: " in html
    assert "2 of 9 conversations match" in c.get("/data", params={"id": "r", "q": "is 11"}).text  # 5+6, 11+12
    assert "0 of 9 conversations match" in c.get("/data", params={"id": "r", "q": "Row("}).text  # control


def test_data_page_shows_a_row_the_template_cannot_render(tmp_path, tiny_dir):
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    rows = [{"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "tool_calls": [call]},
                          {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3."}]},
            {"messages": [{"role": "user", "content": "Hi <b>"}, {"role": "assistant", "content": "Hello."}]}]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = data_run(tmp_path, tiny_dir, data)
    html = c.get("/data", params={"id": "r"}).text
    assert f"<h3>{data}:1: not rendered, so not trained</h3>" in html
    assert '<p class="note">messages[1] has tool calls, which this chat template does not write' in html
    assert '<span class="trained">Hello.&lt;|im_end|&gt;</span>' in html  # the next row is still shown


def test_data_page_renders_with_the_runs_template_kwargs(tmp_path, tiny_dir, data_file):
    """The page shows what training saw: data.template_kwargs are part of the template (they were
    left out, so a template that reads one, like Qwen3's enable_thinking, rendered otherwise)."""
    template = tmp_path / "mode.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}{% if mode is defined %} [{{ mode }}]{% endif %}"
                        "\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    c = data_run(tmp_path, tiny_dir, data_file, template=str(template), template_kwargs={"mode": "terse"})
    html = c.get("/data", params={"id": "r", "q": f"{data_file.name}:3"}).text
    assert "&lt;|im_start|&gt;user [terse]" in html


def test_ui_binds_localhost_by_default_and_warns_otherwise(tmp_path, monkeypatch, capsys):
    import uvicorn

    args = build_parser().parse_args(["ui"])
    assert (args.runs_dir, args.host, args.port) == ("runs", "127.0.0.1", 7860)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    server.serve(tmp_path, port=7861)
    assert calls[-1] == {"host": "127.0.0.1", "port": 7861, "log_level": "warning"}
    assert "warning" not in capsys.readouterr().err
    server.serve(tmp_path, host="0.0.0.0", port=7862)
    assert calls[-1]["host"] == "0.0.0.0"
    assert "warning: sft ui listens on 0.0.0.0: anyone who can reach this machine" in capsys.readouterr().err
