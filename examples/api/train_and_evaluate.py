"""Train and evaluate a small run from Python, the way a notebook would: `from sft import ...`.

    python examples/api/train_and_evaluate.py                      # SmolLM2-135M-Instruct, 20 steps, CPU is fine
    python examples/api/train_and_evaluate.py --model DIR --steps 2 --out /tmp/api-run

It writes a tiny data set (questions about a made-up assistant, "Quill") next to the run, trains
with `sft.train`, then scores the tuned model with `sft.evaluate` and prints what changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sft import build_dataset, evaluate, load_config, train

FACTS = [
    ("What is your name?", "My name is Quill."),
    ("Who are you?", "I am Quill, a small writing assistant."),
    ("What do you help with?", "I help with short pieces of writing."),
    ("Who made you?", "I was fine-tuned with sft."),
]


def write_data(root: Path) -> tuple[Path, Path]:
    """Every fact phrased four ways for training; the plain questions are the eval set."""
    rows = [{"messages": [{"role": "user", "content": f"{lead}{q}"}, {"role": "assistant", "content": a}]}
            for lead in ("", "Hi! ", "Quick question: ", "Please tell me: ") for q, a in FACTS]
    root.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = root / "train.jsonl", root / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows[: len(FACTS)]), encoding="utf-8")
    return train_file, eval_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default="runs/api-example")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    out = Path(args.out)
    train_file, eval_file = write_data(out / "data")
    cfg = load_config(None, [
        f"--model={args.model}", f"--output_dir={out / 'run'}", f"--data.train={train_file}",
        f"--eval.data={eval_file}", "--eval.metric=contains", "--eval.max_new_tokens=16",
        "--eval.before_after=true", "--eval.reference_tokens=1024",  # a quick forgetting figure (default 16384)
        f"--train.max_steps={args.steps}", "--train.batch_size=4",
        "--train.lr=1e-4", "--train.warmup=0", "--data.max_length=128",
        f"--data.cache_dir={out / 'cache'}",
    ])

    data = build_dataset(cfg)  # what the run will train on, tokenized and masked
    print(f"{len(data.examples)} training examples, {data.report.trained_tokens} trained tokens")

    result = train(cfg, overwrite=True, progress=False)
    print(f"trained {result.last_step} steps: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    if result.final_dir is None or result.before is None:
        raise SystemExit(f"the run stopped early ({result.stop_reason}); see {result.output_dir}")

    again = evaluate(cfg, result.final_dir, progress=False)  # the tuned model, scored on its own
    print(f"task accuracy {result.before['task_accuracy']:.2f} -> {again['task_accuracy']:.2f} "
          f"(eval loss {result.before['eval_loss']:.3f} -> {again['eval_loss']:.3f})")
    print(f"model: {result.final_dir}")


if __name__ == "__main__":
    main()
