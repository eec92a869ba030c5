"""`sft sweep`: a grid of normal training runs, pruned, chosen under a forgetting budget
(`sft lr-find`, which proposes the grid, lives in lr_find.py).

Each trial is an ordinary ``sft train`` run in ``output_dir/trials/<name>/`` with its own complete
``config.yaml``, metrics, checkpoints and eval, so it can be inspected, resumed or used alone.
Sweep bookkeeping per trial lives in ``trial.json`` (status, prune reason, wall time).
The pure parts (grid expansion, trial names, choice; the pruning rules in prune.py) are plain
functions on lists and dicts; ``run_sweep`` only wires them to ``train()`` (injectable as
``train_fn`` for tests).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sft.atomic import atomic_write_text
from sft.config import (
    Config,
    from_dict,
    load_config,
    parse_override,
    resolve_path,
    set_dotted,
    to_dict,
    validate,
)
from sft.errors import NonFiniteLoss, SftError
from sft.reporting.sweep_report import (
    OBJECTIVES,
    choose,
    read_json,
    read_metrics,
    summarize_trial,
    write_sweep_report,
)
from sft.tuning.prune import PruneRules, comparable, prune_reason

if TYPE_CHECKING:
    from sft.training.loop import RunResult

# ---------------------------------------------------------------------------------------------
# grid: command-line lists and sweep.grid -> one override dict per trial


def split_overrides(overrides: list[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """Split ``--key=a,b`` (a grid axis) from ``--key=v`` (a plain override).

    A value in brackets or braces is one YAML value, not an axis.

    >>> split_overrides(["--train.lr=1e-5,3e-5", "--train.max_steps=20", "--lora.target_modules=[q,v]"])
    ({'train.lr': [1e-05, 3e-05]}, ['--train.max_steps=20', '--lora.target_modules=[q,v]'])
    """
    grid: dict[str, list[Any]] = {}
    plain: list[str] = []
    for item in overrides:
        key, _ = parse_override(item)  # validates the --key=value shape
        raw = item.split("=", 1)[1]
        if "," in raw and raw.strip()[:1] not in "[{\"'":
            grid[key] = [parse_override(f"{key}={piece.strip()}")[1] for piece in raw.split(",") if piece.strip()]
        else:
            plain.append(item)
    return grid, plain


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes, the first axis varying slowest.

    >>> expand_grid({"train.lr": [1e-5, 1e-4], "train.batch_size": [4, 8]})  # doctest: +NORMALIZE_WHITESPACE
    [{'train.lr': 1e-05, 'train.batch_size': 4}, {'train.lr': 1e-05, 'train.batch_size': 8},
     {'train.lr': 0.0001, 'train.batch_size': 4}, {'train.lr': 0.0001, 'train.batch_size': 8}]
    >>> expand_grid({})
    [{}]
    """
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SftError(f"sweep.grid.{key}: expected a non-empty list of values, e.g. [1e-5, 1e-4]")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def format_value(value: Any) -> str:
    """A short, file-name-safe spelling of a grid value.

    >>> [format_value(v) for v in (1e-5, 3e-4, 2.5e-05, 0.1, 8, True, "q_proj/v")]
    ['1e-05', '3e-04', '2.5e-05', '0.1', '8', 'true', 'q_proj_v']
    """
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.1:
            mantissa, exp = f"{value:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{exp}"
        return f"{value:g}"
    text = str(value)
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def trial_name(values: dict[str, Any]) -> str:
    """``lr=1e-05,batch_size=8``: the last part of each key, or the whole key when two share it.

    >>> trial_name({"train.lr": 1e-5, "train.batch_size": 8})
    'lr=1e-05,batch_size=8'
    >>> trial_name({"train.lr": 1e-5, "other.lr": 2})
    'train.lr=1e-05,other.lr=2'
    >>> trial_name({})
    'base'
    """
    if not values:
        return "base"
    short = [k.rsplit(".", 1)[-1] for k in values]
    names = [s if short.count(s) == 1 else k for s, k in zip(short, values)]
    return ",".join(f"{n}={format_value(v)}" for n, v in zip(names, values.values()))


def _get_dotted(cfg: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        cfg = cfg[k] if isinstance(cfg, dict) else getattr(cfg, k)
    return cfg


def _absolute(cfg: Config, path: str) -> str:
    p = resolve_path(cfg, path)
    return str(p.resolve()) if p.exists() else path


def trial_config(base: Config, values: dict[str, Any], out: Path) -> Config:
    """``base`` with the grid ``values`` applied, output in ``out``, paths made absolute (so the
    trial's ``config.yaml`` works on its own), and eval before/after forced on when eval data exist."""
    data = to_dict(base)
    for key, value in values.items():
        if key.startswith("sweep.") or key == "output_dir":
            raise SftError(f"{key}: cannot be a sweep axis; sweep over model, data, train, lora or eval keys")
        set_dotted(data, key, value)
    data["output_dir"] = str(out.resolve())
    data["sweep"]["grid"] = {}
    cfg: Config = from_dict(Config, data)
    cfg.base_dir = base.base_dir
    validate(cfg)
    for src in cfg.data.train + cfg.eval.data + cfg.eval.dev:
        src.path = _absolute(cfg, src.path)
    cfg.model = _absolute(cfg, cfg.model)
    if cfg.data.template.endswith(".jinja"):
        cfg.data.template = _absolute(cfg, cfg.data.template)
    if cfg.eval.reference:
        cfg.eval.reference = _absolute(cfg, cfg.eval.reference)
    if cfg.data.cache_dir:
        cfg.data.cache_dir = _absolute(cfg, cfg.data.cache_dir)
    if cfg.eval.has_test or cfg.eval.has_dev:
        cfg.eval.before_after = True
    if cfg.eval.has_dev:  # trials are scored on dev only; the test rows are evaluated once, for the chosen one
        cfg.eval.before_after_split = "dev"
    return cfg


def selected_on(cfg: Config) -> list[str]:
    """The set the trials are compared on, in words: the dev set when there is one, else the eval
    set (which each trial then also reports, so the chosen trial's figures are optimistic).

    >>> from sft.config import Config, EvalConfig, SourceConfig
    >>> selected_on(Config(eval=EvalConfig(data=[SourceConfig("eval.jsonl")], split=0.1)))
    ['eval.jsonl', 'eval.split 0.1 of the training rows']
    >>> selected_on(Config(eval=EvalConfig(data=[SourceConfig("eval.jsonl")], dev_split=0.05)))
    ['eval.dev_split 0.05 of the training rows']
    """
    if cfg.eval.has_dev:
        return [Path(s.path).name for s in cfg.eval.dev] + (
            [f"eval.dev_split {cfg.eval.dev_split:g} of the training rows"] if cfg.eval.dev_split > 0 else [])
    return [Path(s.path).name for s in cfg.eval.data] + (
        [f"eval.split {cfg.eval.split:g} of the training rows"] if cfg.eval.split > 0 else [])


def before_key(cfg: Config) -> str:
    """What the "before" eval of the starting model depends on: everything but the training
    hyperparameters (train.seed stays: it picks the eval.split hold-out). Trials with the same
    key share one before.json."""
    d = to_dict(cfg)
    for k in ("output_dir", "sweep", "lora"):
        d.pop(k, None)
    d["train"] = {"seed": cfg.train.seed}
    d["data"].pop("packing", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# `sft sweep CONFIG [--key=a,b ...]`

class TrainFn(Protocol):
    """``sft.training.loop.train``'s signature (tests pass a fake that writes what it writes)."""

    def __call__(self, cfg: Config, *, resume: bool = ..., progress: bool = ...,
                 stop_check: Callable[[int, float], str | None] | None = ...) -> RunResult: ...


def _losses(trial_dir: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in read_metrics(trial_dir / "metrics.jsonl") if "loss" in r}


def _curve(history: dict[int, float]) -> list[float]:
    return [history[s] for s in sorted(history)]


def _grace(cfg: Config, known_total: int | None) -> int:
    from sft.training.optim import warmup_steps

    total = cfg.train.max_steps or known_total
    warm = warmup_steps(cfg.train, total or 0)  # a fraction of an unknown total counts as 0
    return max(3, warm)


def plan_trials(config_path: str | None, overrides: list[str]) -> tuple[Config, list[tuple[str, dict[str, Any], Config]]]:
    """The base config and (name, grid values, trial config) for every trial, validated up front."""
    cli_grid, plain = split_overrides(overrides)
    base = load_config(config_path, plain)
    grid = {**base.sweep.grid, **cli_grid}  # the command line wins on a shared key
    if base.sweep.seeds < 1:
        raise SftError(f"sweep.seeds: {base.sweep.seeds} must be at least 1")
    if base.sweep.seeds > 1:
        if "train.seed" in grid:
            raise SftError("sweep.seeds: train.seed is already a grid axis; use one or the other")
        grid["train.seed"] = [base.train.seed + i for i in range(base.sweep.seeds)]
    if not grid:
        raise SftError("sweep: no grid to search; give a list on the command line (e.g. --train.lr=1e-5,3e-5,1e-4) "
                       "or a sweep.grid: section in the config")
    if base.sweep.objective not in OBJECTIVES:
        raise SftError(f"sweep.objective: {base.sweep.objective!r} is not supported; use one of {', '.join(OBJECTIVES)}")
    if not base.eval.has_test and not base.eval.has_dev:
        raise SftError(f"sweep.objective: {base.sweep.objective} needs eval data to compare trials; "
                       "set eval.data (conversations whose last assistant turn is the answer) or eval.split")
    root = Path(base.output_dir) / "trials"
    trials, seen = [], set()
    for values in expand_grid(grid):
        cfg = trial_config(base, values, root / "_")
        coerced = {k: _get_dotted(cfg, k) for k in values}
        name = trial_name(coerced)
        if name in seen:
            raise SftError(f"sweep.grid: two trials are both named {name!r}; remove the duplicate value")
        seen.add(name)
        cfg.output_dir = str((root / name).resolve())
        trials.append((name, coerced, cfg))
    return base, trials


def by_setting(summaries: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """Trials that differ only in train.seed, grouped: the mean and spread (sample standard
    deviation) of the objective and of forgetting; a setting is finished when all its seeds are.
    Each trial summary gets its ``setting`` name.

    >>> ts = [{"name": "lr=1e-05,seed=1", "params": {"train.lr": 1e-5, "train.seed": 1}, "status": "finished",
    ...        "task_accuracy": 0.5, "forgetting": 0.1},
    ...       {"name": "lr=1e-05,seed=2", "params": {"train.lr": 1e-5, "train.seed": 2}, "status": "finished",
    ...        "task_accuracy": 0.7, "forgetting": 0.3}]
    >>> s = by_setting(ts, "task_accuracy")[0]
    >>> s["name"], round(s["task_accuracy"], 6), round(s["task_accuracy_sd"], 6), round(s["forgetting"], 6), s["trials"]
    ('lr=1e-05', 0.6, 0.141421, 0.2, ['lr=1e-05,seed=1', 'lr=1e-05,seed=2'])
    """
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for t in summaries:
        rest = {k: v for k, v in t["params"].items() if k != "train.seed"}
        t["setting"] = trial_name(rest)
        groups.setdefault(t["setting"], []).append(t)
    out = []
    for name, ts in groups.items():
        done = all(t["status"] == "finished" for t in ts)
        vals = [t[objective] for t in ts if isinstance(t.get(objective), (int, float))]
        forg = [t["forgetting"] for t in ts if isinstance(t.get("forgetting"), (int, float))]
        out.append({"name": name, "trials": [t["name"] for t in ts], "seeds": len(ts),
                    "status": "finished" if done and len(vals) == len(ts) else "not all seeds finished",
                    objective: statistics.fmean(vals) if vals else None,
                    f"{objective}_sd": statistics.stdev(vals) if len(vals) > 1 else None,
                    "forgetting": statistics.fmean(forg) if len(forg) == len(ts) and forg else None,
                    "forgetting_sd": statistics.stdev(forg) if len(forg) > 1 else None})
    return out


def paired_p_of(trials: dict[str, Path], objective: str) -> Callable[[str, str], float | None]:
    """``paired_p(a, b)``: the p-value of ``sft compare``'s paired test of ``objective`` between
    the after.json of trials a and b (the same dev rows), None when either lacks per-row data."""
    from sft.evaluation.compare import compare_two

    def paired_p(a: str, b: str) -> float | None:
        ra, rb = read_json(trials[a] / "after.json"), read_json(trials[b] / "after.json")
        if ra is None or rb is None:
            return None
        row = next((r for r in compare_two(ra, rb) if r["metric"] == objective), None)
        return None if row is None else row["p"]

    return paired_p


EvalFn = Callable[..., int]  # run_eval(cfg, model=, out=) -> status; writes the eval JSON


def figures_on_test(root: Path, name: str, cfg: Config, eval_fn: EvalFn) -> dict[str, Any]:
    """The chosen trial and its starting model on the test rows (eval.data / eval.split), computed
    once, after the choice on dev; kept in ``root/test.json`` (re-used while the choice stands)."""
    from sft.evaluation.compare import compare_two

    path = root / "test.json"
    done = read_json(path)
    if isinstance(done, dict) and done.get("trial") == name:
        return done
    test_cfg = from_dict(Config, to_dict(cfg))
    test_cfg.base_dir = cfg.base_dir
    test_cfg.eval.before_after_split = "eval"
    print(f"sweep: test figures of {name} (the starting model, then the chosen trial), once ...", flush=True)
    eval_fn(test_cfg, model=None, out=str(root / "test_before.json"))
    eval_fn(test_cfg, model=str(Path(cfg.output_dir) / "final"), out=str(root / "test_after.json"))
    before, after = read_json(root / "test_before.json"), read_json(root / "test_after.json")
    out = {"trial": name, "before": before, "after": after, "comparison": compare_two(before, after)}
    atomic_write_text(path, json.dumps(out, indent=1, default=str))
    return out


def run_sweep(config_path: str | None, overrides: list[str], train_fn: TrainFn | None = None,
              progress: bool = True, eval_fn: EvalFn | None = None) -> int:
    """Run (or continue) every trial, then choose and write ``sweep.{json,md,html}``.

    Finished and pruned trials are skipped; interrupted ones resume from their checkpoint. With a
    dev set the trials are compared on dev (ties: not detectably different, broken by less
    forgetting), and the chosen one is then evaluated once on the test rows (``test.json``).
    """
    base, trials = plan_trials(config_path, overrides)
    if train_fn is None:
        from sft.training.loop import train

        train_fn = train
    root = Path(base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    finished: dict[str, list[float]] = {}
    known_total: int | None = None
    for name, _, cfg in trials:
        if (Path(cfg.output_dir) / "run_state.json").exists():
            finished[name] = _curve(_losses(Path(cfg.output_dir)))
            known_total = known_total or (read_json(Path(cfg.output_dir) / "run_state.json") or {}).get("steps")

    print(f"sweep: {len(trials)} trials in {root / 'trials'}", flush=True)
    for n, (name, values, cfg) in enumerate(trials, 1):
        out = Path(cfg.output_dir)
        state = read_json(out / "trial.json") or {}
        if (out / "run_state.json").exists() or state.get("status") == "pruned":
            print(f"[{n}/{len(trials)}] {name}: {'finished' if name in finished else 'pruned'} earlier; skipped")
            continue
        out.mkdir(parents=True, exist_ok=True)
        resume = (out / "checkpoints").is_dir()
        shared = root / f"before-{before_key(cfg)}.json"
        if cfg.eval.before_after and shared.exists() and not (out / "before.json").exists():
            shutil.copyfile(shared, out / "before.json")  # the starting model is the same: evaluate it once
        if (out / "before.json").exists():
            resume = True  # train() then skips its "before" eval and reads before.json for its report
        rules = PruneRules(grace=_grace(cfg, known_total))
        history = _losses(out)

        peers = {n for n, v, _ in trials if comparable(v, values)}  # same plan and schedule: step k is step k

        def check(step: int, loss: float, history: dict[int, float] = history, rules: PruneRules = rules,
                  peers: set[str] = peers) -> str | None:
            history[step] = loss
            return prune_reason(_curve({s: v for s, v in history.items() if s <= step}),
                                [c for n, c in finished.items() if n in peers], rules)

        print(f"[{n}/{len(trials)}] {name}: {'resuming' if (out / 'checkpoints').is_dir() else 'training'} -> {out}",
              flush=True)
        t0 = time.perf_counter()
        record: dict[str, Any] = {"name": name, "params": values, "status": "finished", "reason": None}
        result = None
        try:
            result = train_fn(cfg, resume=resume, progress=progress, stop_check=check if base.sweep.prune else None)
        except NonFiniteLoss as e:  # train.on_nan: stop: a diverged trial, by type (loss or gradient norm)
            record.update(status="pruned", reason=e.reason)
            print(f"[{n}/{len(trials)}] {name}: pruned: {e.reason}", file=sys.stderr)
        except SftError as e:
            record.update(status="failed", reason=str(e))
            print(f"[{n}/{len(trials)}] {name}: {record['status']}: {record['reason']}", file=sys.stderr)
        record["wall_s"] = round(float(state.get("wall_s", 0.0)) + time.perf_counter() - t0, 1)
        if cfg.eval.before_after and not shared.exists() and (out / "before.json").exists():
            shutil.copyfile(out / "before.json", shared)
        if result is not None and result.interrupted:
            record["status"] = "interrupted"
        elif result is not None and result.stop_reason:
            record.update(status="pruned", reason=result.stop_reason)
            print(f"[{n}/{len(trials)}] {name}: pruned: {result.stop_reason}", flush=True)
        atomic_write_text(out / "trial.json", json.dumps(record, indent=1, default=str))  # read back on resume
        if record["status"] == "finished":
            finished[name] = _curve(_losses(out))
            known_total = known_total or getattr(result, "steps", None)
        if record["status"] == "interrupted":
            print(f"sweep interrupted during {name}; run the same `sft sweep` command again to continue", flush=True)
            break

    summaries = [summarize_trial(Path(cfg.output_dir), name, values) for name, values, cfg in trials]
    dev = base.eval.has_dev
    paired = paired_p_of({name: Path(cfg.output_dir) for name, _, cfg in trials}, base.sweep.objective) if dev else None
    seeds = None
    if base.sweep.seeds > 1:  # choose a setting on its mean over seeds; its first seed's trial stands for it
        seeds = by_setting(summaries, base.sweep.objective)
        setting, why = choose(seeds, base.sweep.objective, base.sweep.max_forgetting)
        best = next((s["trials"][0] for s in seeds if s["name"] == setting), None)
        why = {t["name"]: f"setting {t['setting']}: {why[t['setting']]}" for t in summaries}
    else:
        best, why = choose(summaries, base.sweep.objective, base.sweep.max_forgetting, paired)
    axes = {k: list(dict.fromkeys(v[k] for _, v, _ in trials)) for k in trials[0][1]}
    settings: dict[str, Any] = {"grid": axes, "objective": base.sweep.objective,
                "max_forgetting": base.sweep.max_forgetting, "prune": base.sweep.prune,
                "selected_on": "dev" if dev else "eval", "selected_on_sets": selected_on(base),
                "seeds": base.sweep.seeds}
    if seeds is not None:
        settings["by_setting"] = seeds
    test = None
    if dev and best is not None and base.eval.has_test:
        if eval_fn is None:
            from sft.evaluation.evaluate import run_eval

            eval_fn = run_eval
        test = figures_on_test(root, best, next(cfg for name, _, cfg in trials if name == best), eval_fn)
    befores = sorted(root.glob("before-*.json"))
    paths = write_sweep_report(root, summaries, best, why, settings, read_json(befores[0]) if befores else None,
                               test)
    for t in summaries:
        print(f"  {t['name']}: {why.get(t['name'], t['status'])}")
    print(f"Best: {best} -> {Path(base.output_dir) / 'trials' / best}" if best else "No trial qualifies.")
    print(f"Report: {paths[2]} and {paths[1]}", flush=True)
    interrupted = any(t["status"] == "interrupted" for t in summaries)
    return 130 if interrupted else 0
