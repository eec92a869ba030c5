"""``sft data check | preview | tokenize``: each takes the loaded Config and returns the exit code.

None of them loads model weights: only the tokenizer (``sft.models.load_tokenizer``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from sft.config import Config
from sft.data.batching import plan_steps
from sft.data.check import (
    format_report,
    histogram,
    legend,
    percentiles,
    render,
    spans,
)
from sft.data.pipeline import DataReport, build_dataset, collect_conversations
from sft.data.quality import KINDS, format_quality
from sft.data.select import format_summary, score_summary
from sft.errors import SftError


def _tokenizer(cfg: Config) -> Any:
    from sft.models.load import load_tokenizer

    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)


def _packing(lengths: Sequence[int] | np.ndarray, cfg: Config) -> tuple[int, float | None]:
    """(sequences the trainer will see, packing efficiency or None without packing)."""
    from sft.data.packing import best_fit_decreasing, packing_efficiency

    if not cfg.data.packing or not len(lengths):
        return len(lengths), None
    bins = best_fit_decreasing(lengths, cfg.data.max_length)
    return len(bins), packing_efficiency(lengths, bins, cfg.data.max_length)


def report_dict(cfg: Config, report: DataReport, lint: list[str]) -> dict[str, Any]:
    """The JSON of ``sft data check``: the report plus length, packing and step statistics."""
    out = report.to_dict()
    sequences, efficiency = _packing(report.lengths, cfg)
    out["length_percentiles"] = percentiles(report.lengths)
    out["length_histogram"] = histogram(report.lengths, limit=cfg.data.max_length)
    out["packing"] = cfg.data.packing
    out["packed_sequences"] = sequences
    out["packing_efficiency"] = None if efficiency is None else round(efficiency, 6)
    t = cfg.train
    # the trainer's own plan, so the estimate is its exact step count
    plan = plan_steps(report.lengths, t.batch_size, t.grad_accum, cfg.data.packing, cfg.data.max_length,
                      t.epochs, t.max_steps, t.seed)
    out["estimated_steps"] = len(plan)
    out["lint"] = lint
    return out


def check(cfg: Config, as_json: bool = False, stream: TextIO | None = None,
          scores: list[dict[str, Any]] | None = None) -> int:
    """Validate every row and report statistics and template lint; 1 when rows are invalid and
    ``data.on_invalid`` is ``error`` (the report is printed either way). ``scores`` (``sft data
    check --score``, from sft.evaluation.scoring) add their distribution and suspect rows."""
    from sft.data.chat import end_of_turn_tokens
    from sft.data.pipeline import lint_dataset

    out = stream or sys.stdout
    tok = _tokenizer(cfg)
    ds = build_dataset(cfg, tok, "train", strict=False)
    result = report_dict(cfg, ds.report, lint_dataset(ds, tok))
    result["quality"] = {k: ds.quality.get(k, []) for k in KINDS}  # sft.data.quality: rows that hurt tuning
    if scores is not None:
        result["quality"]["scores"] = score_summary(scores)
    marker, eot_ids = end_of_turn_tokens(tok, ds.template)  # trained after every assistant turn
    result["end_of_turn"] = {"text": marker, "ids": eot_ids, "tokens": tok.convert_ids_to_tokens(eot_ids)}
    if cfg.eval.data or cfg.eval.split:
        result["eval"] = report_dict(cfg, build_dataset(cfg, tok, "eval", strict=False).report, [])
    invalid = bool(result["invalid"]) or bool(result.get("eval", {}).get("invalid"))
    empty = not result["examples"]  # an empty file, every row invalid and skipped, or every row dropped
    failed = (invalid and cfg.data.on_invalid == "error") or empty
    if as_json:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        out.write(format_report(result, cfg.data.max_length) + "\n")
        out.write(format_quality({k: result["quality"][k] for k in KINDS}, ds.report.quality_dropped) + "\n")
        if scores is not None:
            out.write(format_summary(result["quality"]["scores"]) + "\n")
        eot = result["end_of_turn"]
        kind = "special token" if len(eot["ids"]) == 1 else "plain-text tokens"
        out.write(f"end of turn (trained after every assistant turn): {eot['text']!r} = {kind} "
                  f"{eot['tokens']} {eot['ids']}\n" if eot["text"] else "end of turn: none (see the warnings)\n")
        if "eval" in result:
            out.write("\neval split:\n" + format_report(result["eval"], cfg.data.max_length) + "\n")
        if invalid and cfg.data.on_invalid == "error":
            out.write("\ninvalid rows: fix them, or set data.on_invalid: skip to drop them\n")
    if empty:
        sys.stderr.write("error: data.train: no usable training examples (the data is empty, or every row is "
                         "invalid or dropped; see the report); add rows or fix them\n")
    return 1 if failed else 0


def preview(cfg: Config, n: int = 3, stream: TextIO | None = None, color: bool | None = None) -> int:
    """The first ``n`` examples as the model sees them, trained tokens marked, with a legend."""
    from sft.data.chat import config_template

    out = stream or sys.stdout
    if color is None:
        color = out.isatty() and not os.environ.get("NO_COLOR")
    tok = _tokenizer(cfg)
    template = config_template(cfg, tok)
    convs, report = collect_conversations(cfg, "train")
    out.write(legend(color) + "\n")
    if report.invalid:
        out.write(f"({report.invalid_rows} invalid rows not shown; run `sft data check` for the list)\n")
    for item in preview_items(cfg, tok, template, convs[:n]):
        if "error" in item:
            out.write(f"\n=== {item['where']}: not rendered, so not trained ===\nerror: {item['error']}\n")
            continue
        out.write(f"\n=== {item['where']}: {item['tokens']} tokens, {item['trained']} trained{item['note']} ===\n")
        out.write(render(item["pieces"], color) + "\n")
    if not convs:
        out.write("(no valid conversations)\n")
    return 0


def preview_items(cfg: Config, tok: Any, template: str, convs: list[Any]) -> list[dict[str, Any]]:
    """Each conversation's examples as the model sees them: ``where`` (file:line), ``tokens``,
    ``trained``, ``note`` and ``pieces``, the decoded text in runs of (text, trained); a conversation
    the template cannot render (which ``sft data check`` lists as invalid) gives ``where`` and
    ``error`` only. Shared by ``sft data preview`` and ``sft ui``'s data page."""
    from sft.data.chat import encode_all
    from sft.data.pipeline import truncate_example

    items: list[dict[str, Any]] = []
    for conv in convs:
        try:
            examples = encode_all(conv, tok, template, cfg.data.train_on, cfg.data.reasoning)
        except SftError as e:
            items.append({"where": conv.location(), "error": str(e).removeprefix(f"{conv.location()}: ")})
            continue
        for k, ex in enumerate(examples):
            note = f", example {k + 1} of {len(examples)} (one per assistant turn)" if len(examples) > 1 else ""
            if len(ex) > cfg.data.max_length:
                if cfg.data.truncation == "truncate":
                    ex, note = truncate_example(ex, cfg.data.max_length), note + f", truncated to {cfg.data.max_length}"
                else:
                    note += f", longer than max_length {cfg.data.max_length}: dropped in training"
            pieces = [(tok.decode(ex.input_ids[a:b]), trained) for a, b, trained in spans(ex.labels)]
            items.append({"where": conv.location(), "tokens": len(ex), "trained": ex.num_trained, "note": note,
                          "pieces": pieces})
    return items


def tokenize(cfg: Config, out: str) -> int:
    """Write one ``{"input_ids", "labels"}`` JSON object per kept example, in input order.

    The file appears only when complete (``sft.atomic``); an unwritable ``--out`` fails first."""
    from sft.atomic import atomic_open, check_out_file

    path = Path(out)
    check_out_file(path, "--out", "tokens.jsonl")
    tok = _tokenizer(cfg)
    ds = build_dataset(cfg, tok, "train")
    with atomic_open(path) as f:
        for ex in ds.examples:
            f.write(json.dumps({"input_ids": ex.input_ids, "labels": ex.labels}) + "\n")
    r = ds.report
    sys.stderr.write(
        f"wrote {len(ds.examples)} examples to {path} (dropped too long {r.dropped_too_long}, "
        f"nothing to train {r.dropped_untrainable}, truncated {r.truncated}, invalid skipped {r.skipped})\n"
    )
    return 0
