"""`sft sweep` / `sft lr-find`: grid expansion, pruning, choice, orchestration (with a fake train
function) and the report files; one slow end-to-end sweep on a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from sft.config import Config
from sft.errors import NonFiniteLoss, SftError
from sft.reporting.sweep_report import choose
from sft.training.loop import RunResult
from sft.tuning.lr_find import propose_grid, range_lrs
from sft.tuning.prune import PruneRules, prune_reason
from sft.tuning.sweep import (
    expand_grid,
    plan_trials,
    run_sweep,
    split_overrides,
    trial_name,
)

# ---------------------------------------------------------------------------------------------
# grid


def _write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "eval.jsonl").write_text('{"messages": []}\n')
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        "model: smollm2-135m-instruct\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "data:\n  train: train.jsonl\n"
        "eval:\n  data: eval.jsonl\n"
        "train:\n  max_steps: 6\n  warmup: 0\n" + extra
    )
    return cfg


def test_split_overrides_lists_are_axes_single_values_are_overrides() -> None:
    grid, plain = split_overrides(["--train.lr=1e-5,3e-5,1e-4", "--train.max_steps=20", "--data.packing=false,true"])
    assert grid == {"train.lr": [1e-5, 3e-5, 1e-4], "data.packing": [False, True]}
    assert plain == ["--train.max_steps=20"]


def test_grid_from_cli_and_yaml_names_and_trial_configs(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-5 as a string: the name must come from the coerced float.
    path = _write_config(tmp_path, "sweep:\n  grid:\n    train.lr: [1e-5, 3e-4]\n")
    base, trials = plan_trials(str(path), ["--train.batch_size=2,4", "--train.seed=7"])
    names = [name for name, _, _ in trials]
    assert names == ["lr=1e-05,batch_size=2", "lr=1e-05,batch_size=4", "lr=3e-04,batch_size=2", "lr=3e-04,batch_size=4"]
    name, values, cfg = trials[2]
    assert values == {"train.lr": 3e-4, "train.batch_size": 2}
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.seed) == (3e-4, 2, 7)
    assert cfg.output_dir == str((tmp_path / "out" / "trials" / name).resolve())
    assert cfg.eval.before_after is True  # forced: eval data exist
    assert cfg.data.train[0].path == str((tmp_path / "train.jsonl").resolve())  # config.yaml works on its own
    assert cfg.sweep.grid == {} and base.sweep.grid == {"train.lr": ["1e-5", "3e-4"]}


def test_expand_grid_and_names() -> None:
    assert expand_grid({"a.x": [1, 2], "b.y": ["p"]}) == [{"a.x": 1, "b.y": "p"}, {"a.x": 2, "b.y": "p"}]
    assert trial_name({"train.lr": 1e-4}) == "lr=1e-04"
    with pytest.raises(SftError, match="non-empty list"):
        expand_grid({"train.lr": []})


def test_grid_errors_are_caught_before_training(tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    with pytest.raises(SftError, match="no grid"):
        plan_trials(str(path), [])
    with pytest.raises(SftError, match="did you mean 'lr'"):
        plan_trials(str(path), ["--train.lrr=1e-5,1e-4"])
    with pytest.raises(SftError, match="both named"):
        plan_trials(str(path), ["--train.lr=1e-5,0.00001"])
    no_eval = tmp_path / "no_eval.yaml"
    no_eval.write_text(path.read_text().replace("eval:\n  data: eval.jsonl\n", ""))
    with pytest.raises(SftError, match="needs eval data"):
        plan_trials(str(no_eval), ["--train.lr=1e-5,1e-4"])


# ---------------------------------------------------------------------------------------------
# pruning and choice (pure)


def test_pruning_divergence_nan_and_behind() -> None:
    rules = PruneRules(grace=2, window=2)
    normal = [2.0, 1.9, 1.7, 1.6, 1.5]
    assert all(prune_reason(normal[:k], [], rules) is None for k in range(1, 6))
    diverging = [2.0, 2.2, 2.9, 3.4]
    assert prune_reason(diverging, [], rules) == "diverged: loss 3.15 at step 4 > 1.5 x the first step (2)"
    assert prune_reason(diverging[:3], [], rules) is None  # 2.55 is still below 3.0
    assert prune_reason([2.0, float("nan")], [], rules) == "diverged: loss is nan at step 2"
    # behind: needs two finished curves reaching this step, and a margin over the worst
    done = [[2.0, 1.5, 1.2, 1.0], [2.0, 1.6, 1.3, 1.1]]
    slow = [2.0, 1.9, 1.85, 1.8]
    assert prune_reason(slow, done, rules) == "behind: loss 1.825 at step 4 > 1.2 (worst finished trial) + 10%"
    assert prune_reason(slow, done[:1], rules) is None
    assert prune_reason([2.0, 1.7, 1.35, 1.25], done, rules) is None  # 1.3 < 1.2 x 1.1: kept (control)


def _trial(name: str, acc: float | None, forget: float | None, status: str = "finished", **kw: Any) -> dict[str, Any]:
    return {"name": name, "status": status, "task_accuracy": acc, "eval_loss": kw.get("eval_loss"),
            "forgetting": forget, "reason": kw.get("reason")}


def test_choice_under_a_forgetting_budget() -> None:
    trials = [
        _trial("lr=1e-05", 0.40, 0.01),
        _trial("lr=3e-05", 0.55, 0.06),
        _trial("lr=1e-04", 0.80, 0.25),  # best accuracy, over budget
        _trial("lr=1e-02", None, None, status="pruned", reason="diverged: loss is nan at step 3"),
    ]
    best, why = choose(trials, "task_accuracy", 0.10)
    assert best == "lr=3e-05"
    assert why == {
        "lr=1e-05": "lower task_accuracy: 0.4 vs 0.55 (lr=3e-05)",
        "lr=3e-05": "chosen: best task_accuracy (0.55) within the forgetting budget (+10.0%)",
        "lr=1e-04": "over the forgetting budget: reference perplexity +25.0% > +10.0%",
        "lr=1e-02": "pruned: diverged: loss is nan at step 3",
    }
    # control: without a budget the most accurate trial wins
    assert choose(trials, "task_accuracy", None)[0] == "lr=1e-04"


def test_choice_eval_loss_lower_is_better_and_unknown_objective() -> None:
    trials = [_trial("a", None, 0.0, eval_loss=1.2), _trial("b", None, 0.0, eval_loss=0.9)]
    best, why = choose(trials, "eval_loss", None)
    assert best == "b" and why["a"] == "higher eval_loss: 1.2 vs 0.9 (b)"
    tied = [_trial("a", 0.5, 0.2), _trial("b", 0.5, 0.1)]
    best, why = choose(tied, "task_accuracy", None)
    assert best == "b" and why["a"] == "tied on task_accuracy (0.5) with b, which forgets less or comes first in the grid"
    with pytest.raises(SftError, match=r"sweep\.objective"):
        choose(trials, "accuracy", None)


def test_lr_find_grid_stays_below_the_divergence_point() -> None:
    lrs = range_lrs(13, 1e-7, 1e-1)  # half a decade per step
    smoothed = [3.0, 3.0, 2.99, 2.95, 2.8, 2.4, 1.9, 1.6, 1.5, 1.55, 2.5, 6.0, 20.0]
    grid = propose_grid(lrs, smoothed)
    assert grid == [1e-05, 3e-05, 1e-04, 3e-04]
    assert max(grid) < lrs[smoothed.index(min(smoothed))]
    with pytest.raises(SftError, match="never fell"):
        propose_grid(lrs[:3], [2.0, 2.5, 9.0])


# ---------------------------------------------------------------------------------------------
# orchestration with a fake train(): files as train() writes them


class FakeTrain:
    """Writes what train() writes; the loss falls for lr <= 1e-3 and explodes above it."""

    def __init__(self, interrupt_at: dict[str, int] | None = None, nan_for: float | None = None,
                 schedule_scaled: bool = False) -> None:
        self.schedule_scaled = schedule_scaled  # a longer run falls slower per step (its warm-up is longer)
        self.calls: list[tuple[str, bool]] = []
        self.before_evals = 0
        self.interrupt_at = interrupt_at or {}
        self.nan_for = nan_for

    def __call__(self, cfg: Config, resume: bool = False, progress: bool = True, stop_check: Any = None) -> RunResult:
        out = Path(cfg.output_dir)
        name = out.name
        self.calls.append((name, resume))
        out.mkdir(parents=True, exist_ok=True)
        if cfg.eval.before_after and not resume:
            self.before_evals += 1
            (out / "before.json").write_text(json.dumps({"eval_loss": 2.0, "task_accuracy": 0.1,
                                                         "forgetting": {"reference_perplexity": 20.0}}))
        metrics = out / "metrics.jsonl"
        start = 0
        if resume and (out / "checkpoints").is_dir():
            start = int((out / "checkpoints" / "step").read_text())
        rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start))
        lr, total = cfg.train.lr, cfg.train.max_steps or 6
        result = RunResult(out, total)
        for step in range(start + 1, total + 1):
            if self.nan_for == lr and step == 3:
                raise NonFiniteLoss(f"step {step}: loss is nan. Likely causes: learning rate too high", step, "loss",
                                    math.nan)
            rate = 6 / total if self.schedule_scaled else 1.0
            loss = 2.0 - 0.1 * step * lr * 1e4 * rate if lr <= 1e-3 else 2.0 * 1.4**step
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "elapsed_s": step * 0.5}) + "\n")
            result.losses.append(loss)
            reason = stop_check(step, loss) if stop_check else None
            if reason or self.interrupt_at.get(name) == step:
                (out / "checkpoints").mkdir(exist_ok=True)
                (out / "checkpoints" / "step").write_text(str(step))
                result.stop_reason, result.interrupted = reason, reason is None
                if self.interrupt_at.get(name) == step:
                    del self.interrupt_at[name]
                return result
        assert (out / "before.json").exists(), "every finished trial has its before.json"
        acc = {1e-4: 0.5, 3e-4: 0.7, 1e-3: 0.9}.get(lr, 0.0)
        (out / "after.json").write_text(json.dumps({
            "eval_loss": 1.5 - lr * 100, "task_accuracy": acc, "stop_rate": 1.0,
            "forgetting": {"reference_perplexity": 20.0 * (1 + lr * 300), "kl_to_base": lr * 10}}))
        (out / "final").mkdir()
        (out / "run_state.json").write_text(json.dumps({"status": "finished", "steps": total}))
        return result


def test_sweep_prunes_chooses_and_writes_reports(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "sweep:\n  max_forgetting: 0.15\n")
    fake = FakeTrain()
    rc = run_sweep(str(path), ["--train.lr=1e-4,3e-4,1e-3,1e-2"], train_fn=fake, progress=False)
    assert rc == 0
    assert fake.calls == [("lr=1e-04", False), ("lr=3e-04", True), ("lr=1e-03", True), ("lr=1e-02", True)]
    assert fake.before_evals == 1  # the starting model is evaluated once and copied to later trials
    root = tmp_path / "out"
    report = json.loads((root / "sweep.json").read_text())
    assert report["chosen"] == "lr=3e-04"
    assert report["verdicts"]["lr=1e-03"] == "over the forgetting budget: reference perplexity +30.0% > +15.0%"
    assert report["verdicts"]["lr=1e-02"] == "pruned: diverged: loss 5.697 at step 4 > 1.5 x the first step (2.8)"
    t = {x["name"]: x for x in report["trials"]}
    assert t["lr=1e-02"]["status"] == "pruned" and t["lr=1e-02"]["steps"] == 4
    assert t["lr=3e-04"]["forgetting"] == pytest.approx(0.09) and t["lr=3e-04"]["task_accuracy"] == 0.7
    assert t["lr=3e-04"]["best_eval_loss"] == pytest.approx(1.47)
    html = (root / "sweep.html").read_text()
    assert html.count("<svg") == 2 and "budget +15%" in html and "lr=1e-02" in html
    assert "Chosen: lr=3e-04" in (root / "sweep.md").read_text()
    trial_cfg = (root / "trials" / "lr=3e-04" / "before.json").read_text()
    assert json.loads(trial_cfg)["task_accuracy"] == 0.1

    # a second run skips finished and pruned trials
    again = FakeTrain()
    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4,1e-3,1e-2"], train_fn=again, progress=False) == 0
    assert again.calls == []


def test_behind_rule_compares_only_trials_on_the_same_schedule(tmp_path: Path) -> None:
    """A longer trial is not "behind" because step k of its schedule is earlier in its warm-up:
    max_steps=18, lr=3e-4 falls 3x slower per step than the 6-step trials and runs to the end;
    the control, lr=1e-5 on the 6-step schedule, is as slow against its peers and is pruned."""
    path = _write_config(tmp_path, "")
    grid = ["--train.max_steps=6,18", "--train.lr=1e-3,3e-4,1e-5"]
    assert run_sweep(str(path), grid, train_fn=FakeTrain(schedule_scaled=True), progress=False) == 0
    t = {x["name"]: x for x in json.loads((tmp_path / "out" / "sweep.json").read_text())["trials"]}
    assert t["max_steps=6,lr=1e-05"]["status"] == "pruned"
    assert t["max_steps=6,lr=1e-05"]["reason"].startswith("behind: loss 1.97 at step 4 > 1.1 ")
    assert t["max_steps=18,lr=3e-04"]["status"] == "finished"  # 1.7 at step 4: compared with the 6-step trials, behind
    assert t["max_steps=18,lr=1e-05"]["status"] == "pruned"  # behind its own peers (18 steps, 1e-3 and 3e-4)


def test_sweep_reports_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills while sweep.json/md/html are rewritten (a second `sft sweep`, every trial
    already done) leaves the previous reports whole and no temporary file (the OSError shows the
    failure did hit a write)."""
    import errno
    import os

    path = _write_config(tmp_path)
    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4"], train_fn=FakeTrain(), progress=False) == 0
    root = tmp_path / "out"
    before = {n: (root / n).read_text() for n in ("sweep.json", "sweep.md", "sweep.html")}
    trial = (root / "trials" / "lr=1e-04" / "trial.json").read_text()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        run_sweep(str(path), ["--train.lr=1e-4,3e-4"], train_fn=FakeTrain(), progress=False)
    assert {n: (root / n).read_text() for n in before} == before
    assert (root / "trials" / "lr=1e-04" / "trial.json").read_text() == trial
    assert not [p.name for p in root.rglob("*.tmp")]


def test_sweep_report_says_it_chooses_on_the_set_it_reports(tmp_path: Path) -> None:
    """The sweep has no separate dev split: it picks the trial on eval.data and reports that same
    set, and every report says so (sweep.json settings.selected_on, sweep.md, sweep.html)."""
    path = _write_config(tmp_path)
    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4", "--eval.split=0.25"], train_fn=FakeTrain(), progress=False) == 0
    root = tmp_path / "out"
    settings = json.loads((root / "sweep.json").read_text())["settings"]
    assert settings["selected_on"] == "eval"
    assert settings["selected_on_sets"] == ["eval.jsonl", "eval.split 0.25 of the training rows"]
    note = ("Chosen on eval.jsonl + eval.split 0.25 of the training rows, the same set the figures below are "
            "measured on: the chosen trial is the best of 2 on it, so its figures are optimistic")
    assert note in (root / "sweep.md").read_text()
    assert note in (root / "sweep.html").read_text()


class FakeDevTrain(FakeTrain):
    """FakeTrain whose after.json (on dev) has per-row outcomes: 40 rows, lr=1e-3 right on 32,
    lr=3e-4 on 30 of the same (2 rows apart: not detectable), lr=1e-4 on 16 (detectably worse)."""

    def __call__(self, cfg: Config, resume: bool = False, progress: bool = True, stop_check: Any = None) -> RunResult:
        assert cfg.eval.before_after_split == "dev"  # trials never score the test rows
        result = super().__call__(cfg, resume, progress, stop_check)
        out = Path(cfg.output_dir)
        right = {1e-4: 16, 3e-4: 30, 1e-3: 32}[cfg.train.lr]
        after = json.loads((out / "after.json").read_text())
        after.update(task_accuracy=right / 40, split="dev",
                     rows={"key": [f"train.jsonl:{i}" for i in range(40)], "correct": "1" * right + "0" * (40 - right)})
        (out / "after.json").write_text(json.dumps(after))
        return result


def test_sweep_on_dev_breaks_ties_by_forgetting_and_tests_the_choice_once(tmp_path: Path, capsys: Any) -> None:
    path = _write_config(tmp_path)
    evals: list[tuple[str | None, str]] = []

    def fake_eval(cfg: Config, model: str | None = None, out: str | None = None) -> int:
        assert cfg.eval.before_after_split == "eval" and out is not None
        evals.append((model and Path(model).parent.name, Path(out).name))
        acc = 0.2 if model is None else 0.6
        Path(out).write_text(json.dumps({"task_accuracy": acc, "split": "eval", "rows": {
            "key": [f"eval.jsonl:{i}" for i in range(50)], "correct": "1" * int(acc * 50) + "0" * int(50 - acc * 50)}}))
        return 0

    grid = ["--train.lr=1e-4,3e-4,1e-3", "--eval.dev_split=0.2"]
    assert run_sweep(str(path), grid, train_fn=FakeDevTrain(), progress=False, eval_fn=fake_eval) == 0
    root = tmp_path / "out"
    report = json.loads((root / "sweep.json").read_text())
    assert report["selected_on"] == "dev" and report["settings"]["selected_on_sets"] == [
        "eval.dev_split 0.2 of the training rows"]
    # lr=1e-3 has the top dev accuracy, but lr=3e-4 is 2 rows behind (McNemar p = 0.5) and forgets less
    assert report["chosen"] == "lr=3e-04"
    assert report["verdicts"]["lr=3e-04"].startswith("chosen: task_accuracy 0.75 is not detectably different")
    assert report["verdicts"]["lr=1e-03"].startswith("tied on task_accuracy with lr=3e-04")
    assert report["verdicts"]["lr=1e-04"].startswith("lower task_accuracy: 0.4 vs 0.8 (lr=1e-03), p=")
    # the test rows: evaluated once, after the choice, for the starting model and the chosen trial
    assert evals == [(None, "test_before.json"), ("lr=3e-04", "test_after.json")]
    test = report["test"]
    assert test["trial"] == "lr=3e-04" and test["after"]["task_accuracy"] == 0.6
    acc = next(c for c in test["comparison"] if c["metric"] == "task_accuracy")
    assert acc["verdict"] == "better" and acc["test"] == "exact McNemar (0 rows only A, 20 only B)"
    md = (root / "sweep.md").read_text()
    assert "Chosen on the dev set" in md and "## Test figures of lr=3e-04 (computed once, after the choice on dev)" in md
    # `sft compare` of two trial directories: their after.json (dev), paired by row
    from sft.cli import main

    trials = root / "trials"
    capsys.readouterr()
    assert main(["compare", str(trials / "lr=3e-04"), str(trials / "lr=1e-03"), "--json"]) == 0
    tied = json.loads(capsys.readouterr().out)["comparisons"][0]["metrics"]
    assert next(m for m in tied if m["metric"] == "task_accuracy")["verdict"] == "no detectable difference at 95%"
    assert main(["compare", str(trials / "lr=1e-04"), str(trials / "lr=1e-03")]) == 0
    out = capsys.readouterr().out
    assert "better" in next(line for line in out.splitlines() if line.startswith("task accuracy"))
    # a second run keeps the choice and does not evaluate the test rows again
    assert run_sweep(str(path), grid, train_fn=FakeDevTrain(), progress=False, eval_fn=fake_eval) == 0
    assert len(evals) == 2


def test_choice_without_paired_data_has_no_ties() -> None:
    """Control for the tie rule: without per-row data (paired_p None) the top trial wins as before."""
    ts = [{"name": "a", "status": "finished", "task_accuracy": 0.8, "forgetting": 0.3},
          {"name": "b", "status": "finished", "task_accuracy": 0.75, "forgetting": 0.1}]
    assert choose(ts, "task_accuracy", None, lambda a, b: None)[0] == "a"
    assert choose(ts, "task_accuracy", None, lambda a, b: 0.5)[0] == "b"
    assert choose(ts, "task_accuracy", None, lambda a, b: 0.01)[0] == "a"


def test_sweep_resumes_an_interrupted_trial(tmp_path: Path) -> None:
    path = _write_config(tmp_path)
    fake = FakeTrain(interrupt_at={"lr=3e-04": 2})
    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4,1e-3"], train_fn=fake, progress=False) == 130
    assert fake.calls == [("lr=1e-04", False), ("lr=3e-04", True)]  # the sweep stops with the interrupt
    status = json.loads((tmp_path / "out" / "trials" / "lr=3e-04" / "trial.json").read_text())["status"]
    assert status == "interrupted"
    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4,1e-3"], train_fn=fake, progress=False) == 0
    assert fake.calls[2:] == [("lr=3e-04", True), ("lr=1e-03", True)]
    metrics = (tmp_path / "out" / "trials" / "lr=3e-04" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    best = json.loads((tmp_path / "out" / "sweep.json").read_text())["chosen"]
    assert best == "lr=1e-03"  # no budget: the most accurate


def test_nan_error_in_a_trial_is_recorded_as_pruned(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "sweep:\n  prune: false\n")
    fake = FakeTrain(nan_for=3e-4)
    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4"], train_fn=fake, progress=False) == 0
    trial = json.loads((tmp_path / "out" / "trials" / "lr=3e-04" / "trial.json").read_text())
    assert (trial["status"], trial["reason"]) == ("pruned", "diverged: loss is nan at step 3")
    assert math.isclose(trial["params"]["train.lr"], 3e-4)


def test_an_error_with_divergence_words_but_another_type_is_failed_not_pruned(tmp_path: Path) -> None:
    """Control: the sweep prunes on the type, not the text; an SftError whose message reads like a
    NaN report is a failure."""
    path = _write_config(tmp_path, "sweep:\n  prune: false\n")

    def fake(cfg: Config, **kw: Any) -> RunResult:
        raise SftError("step 3: loss is nan. Likely causes: learning rate too high")

    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4"], train_fn=fake, progress=False) == 0
    trial = json.loads((tmp_path / "out" / "trials" / "lr=3e-04" / "trial.json").read_text())
    assert trial["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# end to end: the real train() on a tiny Llama with SmolLM2's tokenizer


@pytest.fixture()
def tiny_model_dir(tmp_path: Path, smol_tok: Any) -> Path:
    from conftest import tiny_llama

    d = tmp_path / "tiny"
    tiny_llama(len(smol_tok)).save_pretrained(d, safe_serialization=True)
    smol_tok.save_pretrained(d)
    return d


def _conv(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


@pytest.mark.slow
def test_end_to_end_sweep_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [_conv(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[:2]) + "\n")
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\n"
        f"data:\n  train: train.jsonl\n  cache_dir: {tmp_path / 'cache'}\n  max_length: 64\n"
        "eval:\n  data: eval.jsonl\n  max_new_tokens: 4\n  samples: 1\n"
        "train:\n  max_steps: 3\n  batch_size: 4\n  warmup: 0\n  precision: fp32\n  threads: 2\n"
    )
    assert run_sweep(str(cfg), ["--train.lr=1e-4,1e-2"], progress=False) == 0
    root = tmp_path / "out"
    report = json.loads((root / "sweep.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["finished", "finished"]
    assert all(isinstance(t["forgetting"], float) and t["task_accuracy"] is not None for t in report["trials"])
    assert report["chosen"] in ("lr=1e-04", "lr=1e-02")
    for name in ("lr=1e-04", "lr=1e-02"):
        trial = root / "trials" / name
        assert (trial / "final").is_dir() and (trial / "after.json").exists()
        assert (trial / "before.json").read_text() == (root / "trials" / "lr=1e-04" / "before.json").read_text()
    assert "<svg" in (root / "sweep.html").read_text()


@pytest.mark.slow
def test_lr_find_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path, capsys: Any) -> None:
    from sft.config import load_config
    from sft.tuning.lr_find import run_lr_find

    rows = [_conv(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, [f"--model={tiny_model_dir}", f"--output_dir={tmp_path / 'out'}",
                             f"--data.train={tmp_path / 'train.jsonl'}", f"--data.cache_dir={tmp_path / 'cache'}",
                             "--train.precision=fp32", "--train.batch_size=4"])
    assert run_lr_find(cfg, steps=12, start=1e-5, end=1.0) == 0
    found = json.loads((tmp_path / "out" / "lr_find.json").read_text())
    assert len(found["losses"]) == len(found["smoothed"]) <= 12 and len(found["proposed_grid"]) >= 3
    assert "sft sweep CONFIG --train.lr=" in capsys.readouterr().out


def test_sweep_seeds_repeat_each_setting_and_choose_on_the_mean(tmp_path: Path) -> None:
    path = _write_config(tmp_path, "sweep:\n  seeds: 2\n")

    class SeededTrain(FakeTrain):
        """task accuracy: lr=1e-4 is 0.5 / 0.9 over its seeds (mean 0.7), lr=3e-4 0.75 / 0.75."""

        def __call__(self, cfg: Config, resume: bool = False, progress: bool = True, stop_check: Any = None) -> RunResult:
            result = super().__call__(cfg, resume, progress, stop_check)
            after = json.loads((Path(cfg.output_dir) / "after.json").read_text())
            acc = {(1e-4, 42): 0.5, (1e-4, 43): 0.9}.get((cfg.train.lr, cfg.train.seed), 0.75)
            after["task_accuracy"] = acc
            (Path(cfg.output_dir) / "after.json").write_text(json.dumps(after))
            return result

    fake = SeededTrain()
    assert run_sweep(str(path), ["--train.lr=1e-4,3e-4"], train_fn=fake, progress=False) == 0
    assert [name for name, _ in fake.calls] == ["lr=1e-04,seed=42", "lr=1e-04,seed=43", "lr=3e-04,seed=42",
                                                "lr=3e-04,seed=43"]
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    # the single best trial is lr=1e-4 seed 43 (0.9); on the mean lr=3e-4 (0.75) beats lr=1e-4 (0.7)
    assert report["chosen"] == "lr=3e-04,seed=42"
    s = {x["name"]: x for x in report["settings"]["by_setting"]}
    assert s["lr=1e-04"]["task_accuracy"] == pytest.approx(0.7) and s["lr=1e-04"]["task_accuracy_sd"] == pytest.approx(0.282843, abs=1e-6)
    assert report["verdicts"]["lr=1e-04,seed=43"].startswith("setting lr=1e-04: lower task_accuracy: 0.7 vs 0.75")
    assert "| lr=3e-04 | 2 | 0.75 ± 0 |" in (tmp_path / "out" / "sweep.md").read_text()
    with pytest.raises(SftError, match=r"sweep.seeds: train.seed is already a grid axis"):
        plan_trials(str(path), ["--train.seed=1,2"])


def test_real_trials_diverging_by_nan_loss_or_infinite_gradient_norm_are_pruned(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real train(): at step 2 trial lr=1e-04 gets an infinite gradient (finite loss) and trial
    lr=2e-04 a NaN loss; train.on_nan: stop raises NonFiniteLoss and both are recorded as pruned."""
    import sft.training.step as step_mod

    real = step_mod.forward_backward
    calls = {"n": 0}

    def poisoned(model: Any, batches: Any, n_trained: int, rt: Any, weights: Any = None) -> float:
        loss = real(model, batches, n_trained, rt, weights)
        calls["n"] += 1
        if calls["n"] % 3 == 2:  # step 2 of each 3-step trial
            if poisoned.trial == "lr=1e-04":
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(math.inf)
                return loss
            return math.nan
        return loss

    poisoned.trial = ""  # type: ignore[attr-defined]
    monkeypatch.setattr(step_mod, "forward_backward", poisoned)
    from sft.training.loop import train

    def train_fn(cfg: Config, **kw: Any) -> RunResult:
        poisoned.trial = Path(cfg.output_dir).name  # type: ignore[attr-defined]
        calls["n"] = 0
        return train(cfg, **kw)

    rows = [_conv(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        f"model: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\n"
        f"data:\n  train: train.jsonl\n  cache_dir: {tmp_path / 'cache'}\n  max_length: 64\n"
        "eval:\n  split: 0.2\n"
        "sweep:\n  prune: false\n"
        "train:\n  max_steps: 3\n  batch_size: 2\n  warmup: 0\n  precision: fp32\n  threads: 1\n"
    )
    assert run_sweep(str(cfg), ["--train.lr=1e-4,2e-4"], train_fn=train_fn, progress=False) == 0
    got = {n: json.loads((tmp_path / "out" / "trials" / n / "trial.json").read_text()) for n in ("lr=1e-04", "lr=2e-04")}
    assert (got["lr=1e-04"]["status"], got["lr=1e-04"]["reason"]) == ("pruned", "diverged: gradient norm is inf at step 2")
    assert (got["lr=2e-04"]["status"], got["lr=2e-04"]["reason"]) == ("pruned", "diverged: loss is nan at step 2")
