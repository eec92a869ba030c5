"""`sft train|data|eval|compare|chat|generate|bench|plan|sweep|lr-find|export|ui`: each parses its arguments and calls one function.

Errors the user can fix (SftError, and OSErrors such as a full disk or a path that cannot be
written) print one clear message and exit with status 1, no traceback; usage errors exit 2.
Any other exception is a bug and keeps its traceback; ``SFT_DEBUG=1`` shows tracebacks for all.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sft import __version__
from sft.config import Config, load_config
from sft.errors import SftError


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from sft.training.loop import train

    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess

        import torch

        from sft.launch import torchrun_command
        from sft.models import quantize

        quantize.check(_config(args), args.nproc)  # a bad config fails here, once, not in every process
        if torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
            raise SftError(f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} GPUs; "
                           "use at most one process per GPU")
        return subprocess.call(torchrun_command(args.nproc, args.argv))
    cfg = _config(args)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 130 if result.interrupted else 0  # 130: stopped by a signal, checkpoint saved (as `sft sweep`)


def cmd_data(args: argparse.Namespace) -> int:
    from sft.data import commands

    cfg = _config(args)
    if args.data_cmd == "score":
        from sft.evaluation.scoring import run_score

        return run_score(cfg, scorer=args.scorer, out=args.out)
    if args.data_cmd == "check":
        scores = None
        if args.score:  # the model runs here: sft.data imports nothing that evaluates
            from sft.evaluation.scoring import compute_scores

            scores = compute_scores(cfg, args.scorer)[1]
        return commands.check(cfg, as_json=args.json, scores=scores)
    if args.data_cmd == "preview":
        return commands.preview(cfg, n=args.n)
    return commands.tokenize(cfg, out=args.out)


def cmd_eval(args: argparse.Namespace) -> int:
    from sft.evaluation.evaluate import run_eval

    return run_eval(_config(args), model=args.model, out=args.out)


def cmd_compare(args: argparse.Namespace) -> int:
    from sft.evaluation.compare import run_compare

    return run_compare(args.results, as_json=args.json)


def cmd_chat(args: argparse.Namespace) -> int:
    from sft.evaluation.generate import chat

    return chat(args.model, max_new_tokens=args.max_new_tokens, template=args.template,
                hide_reasoning=args.hide_reasoning)


def cmd_generate(args: argparse.Namespace) -> int:
    from sft.evaluation.generate import generate_file

    return generate_file(args.model, args.prompts, args.out, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, template=args.template)


def cmd_bench(args: argparse.Namespace) -> int:
    from sft.training.throughput import run_bench

    return run_bench(_config(args), steps=args.steps, as_json=args.json, profile=args.profile)


def cmd_plan(args: argparse.Namespace) -> int:
    from sft.training.plan import run_plan

    return run_plan(_config(args), processes=args.nproc, as_json=args.json)


def cmd_sweep(args: argparse.Namespace) -> int:
    from sft.tuning.sweep import run_sweep

    return run_sweep(args.config, args.overrides)


def cmd_lr_find(args: argparse.Namespace) -> int:
    from sft.tuning.lr_find import run_lr_find

    return run_lr_find(_config(args))


def cmd_ui(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sft.ui.server import serve

    return serve(Path(args.runs_dir), host=args.host, port=args.port)


def cmd_export(args: argparse.Namespace) -> int:
    from sft.export.run import run_export

    return run_export(args.source, args.to, quant=args.quant, dtype=args.dtype, out=args.out)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sft",
        description="Supervised fine-tuning of causal language models.",
        epilog="Any config key can be overridden: sft train CONFIG --train.lr=1e-4 --data.packing=false",
    )
    p.add_argument("--version", action="version", version=f"sft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("config", help="YAML config file")
        sp.set_defaults(fn=fn, takes_overrides=True)
        return sp

    t = with_config("train", "fine-tune a model (full or LoRA)", cmd_train)
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in output_dir")
    t.add_argument("--nproc", type=int, help="train with N processes on this machine (starts torchrun; one per GPU)")

    d = sub.add_parser("data", help="check, preview, tokenize or score the training data")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    c = dsub.add_parser("check", help="validate the data and report statistics and lint")
    c.add_argument("config")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--score", action="store_true", help="add the model's scores (sft data score): IFD and "
                   "end-of-turn probability, mismatched and unfinished replies")
    pv = dsub.add_parser("preview", help="show examples with trained tokens marked")
    pv.add_argument("config")
    pv.add_argument("-n", type=positive_int, default=3, help="number of examples (default 3)")
    tk = dsub.add_parser("tokenize", help="write input_ids and labels as JSONL")
    tk.add_argument("config")
    tk.add_argument("--out", required=True, help="output .jsonl file")
    sc = dsub.add_parser("score", help="score every trained reply with a model: loss, loss alone, IFD, "
                         "end-of-turn probability (cached; data.select uses them)")
    sc.add_argument("config")
    sc.add_argument("--out", help="also write the scores here (.jsonl)")
    for sp in (c, sc):
        sp.add_argument("--scorer", help="the scoring model (default: the config's model), e.g. a smaller one "
                        "with the same tokenizer")
    for sp in (c, pv, tk, sc):
        sp.set_defaults(fn=cmd_data, takes_overrides=True)

    e = with_config("eval", "evaluate a model: loss, task accuracy, stop rate, forgetting", cmd_eval)
    e.add_argument("--model", help="model to evaluate instead of the config's model: (e.g. runs/x/final)")
    e.add_argument("--out", help="write the JSON result here")

    cp = sub.add_parser("compare", help="paired tests of eval results against the first: better, worse or "
                        "no detectable difference")
    cp.add_argument("results", nargs="+", metavar="RESULT",
                    help="eval JSONs (eval.json, before.json, after.json) or run directories; one run directory "
                    "alone compares its before.json with its after.json")
    cp.add_argument("--json", action="store_true", help="print one JSON object")
    cp.set_defaults(fn=cmd_compare, takes_overrides=False)

    ch = sub.add_parser("chat", help="chat with a model in the terminal")
    ch.add_argument("model", help="a model directory (e.g. runs/x/final) or packaged alias")
    ch.add_argument("--max-new-tokens", type=positive_int, default=512)
    ch.add_argument("--hide-reasoning", action="store_true",
                    help="show only the answer of a reasoning model (its <think> block is noted, not printed)")
    ch.set_defaults(fn=cmd_chat, takes_overrides=False)

    g = sub.add_parser("generate", help="answer a JSONL file of conversations")
    g.add_argument("model")
    g.add_argument("--prompts", required=True, help="input .jsonl, one {\"messages\": [...]} per line")
    g.add_argument("--out", required=True, help="output .jsonl")
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.set_defaults(fn=cmd_generate, takes_overrides=False)
    for sp in (ch, g):
        sp.add_argument("--template", help="chat template (chatml, gemma, llama3 or a .jinja file) for a model "
                        "without a saved one, e.g. a base model")

    b = with_config("bench", "measure training throughput and memory", cmd_bench)
    b.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default 8)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--profile", action="store_true", help="time the steps under torch.profiler and print the "
                   "share of a step in matmul, attention, elementwise, loss, optimizer and data")

    pl = with_config("plan", "estimate a run's peak memory from the model's config (no weights load), say whether "
                     "it fits this machine and the cheapest change that makes it fit", cmd_plan)
    pl.add_argument("--nproc", type=positive_int, default=1, help="processes the run will use (default 1)")
    pl.add_argument("--json", action="store_true")

    with_config("sweep", "learning-rate (or any key) grid search, e.g. --train.lr=1e-5,1e-4", cmd_sweep)
    with_config("lr-find", "learning-rate range test; proposes a sweep grid", cmd_lr_find)

    x = sub.add_parser("export", help="export a run or model to GGUF (llama.cpp, Ollama, LM Studio), "
                       "merged safetensors or its LoRA adapter")
    x.add_argument("source", metavar="RUN_DIR_OR_MODEL", help="a run directory (runs/x), a model directory or alias")
    x.add_argument("--to", required=True, choices=["gguf", "ollama", "hf", "adapter"])
    x.add_argument("--quant", choices=["f16", "bf16", "q8_0", "q4_k_m"], help="GGUF type (default q8_0)")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="--to hf: weight dtype (default: the model's)")
    x.add_argument("--out", help="output file (gguf) or directory (default: RUN_DIR/export/...)")
    x.set_defaults(fn=cmd_export, takes_overrides=False)

    u = sub.add_parser("ui", help="a local, read-only dashboard of runs: live curves, compare, data preview")
    u.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR", help="folder of runs (default runs)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.set_defaults(fn=cmd_ui, takes_overrides=False)
    return p


_WRITE_FIX = "choose a path you can write (e.g. --output_dir=runs/NAME or another --out)"
_FIXES = {
    errno.ENOSPC: "free disk space or write elsewhere; a run continues from its last checkpoint with --resume",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EFBIG: "the file is too large for this filesystem; write elsewhere",
    errno.EACCES: f"permission denied; {_WRITE_FIX}",
    errno.EPERM: f"not permitted; {_WRITE_FIX}",
    errno.EROFS: f"the filesystem is read-only; {_WRITE_FIX}",
    errno.ENOENT: "a folder on the way does not exist or cannot hold files; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "the path is a folder; give a file name",
    errno.ENAMETOOLONG: "the file name is too long; shorten the path",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError the user can fix: the file, what the system said, what to do.

    >>> os_error_message(OSError(28, "No space left on device", "runs/x/final"))
    'runs/x/final: No space left on device; free disk space or write elsewhere; a run continues from its last checkpoint with --resume (SFT_DEBUG=1 shows the traceback)'
    """
    where = e.filename if e.filename is not None else "writing a file"
    return f"{where}: {e.strerror}; {_FIXES.get(e.errno or 0, 'check the path')} (SFT_DEBUG=1 shows the traceback)"


def _split_overrides(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if item.startswith("--") and getattr(args, "takes_overrides", False):
            if "=" not in item:
                parser.error(f"{item}: overrides need a value, e.g. {item}=VALUE")
            overrides.append(item)  # load_config rejects unknown keys with a suggestion
        else:
            parser.error(f"unrecognized argument: {item}")
    args.overrides = overrides
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # offline (HF_HUB_OFFLINE) is the user's choice
    parser = build_parser()
    args = _split_overrides(parser, sys.argv[1:] if argv is None else argv)
    fn: Any = args.fn
    try:
        return int(fn(args))
    except SftError as e:
        if os.environ.get("SFT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the environment, not the code: a full disk, a path that cannot be written
        if os.environ.get("SFT_DEBUG") or e.errno not in _FIXES:
            raise
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
