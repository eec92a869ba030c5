"""Evaluation: held-out loss, task accuracy, stop rate, response length and forgetting.

- ``eval_loss``/``perplexity``: token CE over the assistant tokens of the eval conversations,
  masked exactly as in training (``build_dataset(cfg, tok, "eval")`` + ``token_loss_sum``).
- ``task_accuracy``: the last assistant turn of each eval conversation is the reference; the model
  answers everything before it (greedy) and the reply is scored with ``eval.metric`` (or the
  source's own ``metric``).
- ``tool_call_accuracy``, ``tool_name_accuracy``, ``tool_call_unparseable``: rows scored with
  ``eval.metric: tool_call`` (``sft.evaluation.tool_calls``); their ``task_accuracy`` is the call accuracy.
- ``stop_rate``: share of replies that ended with the template's end-of-turn token (Gemma's
  ``<end_of_turn>``, ChatML's ``<|im_end|>``; named in ``stop_token``) before ``max_new_tokens``.
  Generation also stops on the tokenizer's EOS, but a reply ended by EOS alone does not count as
  stopped (when the end-of-turn marker is several plain-text tokens, EOS is the only stop there is,
  and it counts).
- ``refusal_rate`` / ``over_refusal_rate``: share of the replies to rows tagged ``"category":
  "harmful"`` / ``"benign"`` (per row or per eval source) that ``sft.evaluation.safety``'s detector
  (``eval.refusal``) calls a refusal; None without such rows.
- ``forgetting``: perplexity on a fixed general-English text (``sft.evaluation.reference``, its
  version recorded), and when a base model is given, the mean per-token KL(base || model) on it.

Every forward pass (held-out loss, generation, forgetting) runs under the run's precision
(``Runtime.autocast``): bf16 matmuls where the run trains in bf16, fp32 everywhere otherwise; the
result records it in ``precision``. Why it matters on a CPU: ``bench/eval_speed.py``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from sft.config import Config
from sft.errors import SftError
from sft.evaluation.result import EvalResult, Forgetting, Losses, Rows, Sample
from sft.evaluation.task import by_type, check_references, constraint_checks, score, split_reference
from sft.runtime import Runtime, local, start

REFERENCE_TOKENS = 16384  # eval.reference_tokens' default: forgetting ratio stable to 1% (bench/RESULTS.md)
REFERENCE_WINDOW = 128  # tokens per forward pass (Gemma's 262k vocab: 128 MiB of fp32 logits)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------------------------------------
# the three measurements


def reference_windows(ids: list[int], tokens: int = REFERENCE_TOKENS, window: int = REFERENCE_WINDOW) -> list[list[int]]:
    """The pieces of ``ids`` that are scored: all of it in ``window``-sized pieces when it has at
    most ``tokens`` ids, else ``tokens // window`` full windows spread evenly over the whole text
    (so a budget samples every part of the reference, not just its first topic).

    >>> reference_windows(list(range(5)), tokens=8, window=2)
    [[0, 1], [2, 3], [4]]
    >>> reference_windows(list(range(20)), tokens=4, window=2)
    [[0, 1], [10, 11]]
    """
    if len(ids) <= tokens:
        return [ids[s : s + window] for s in range(0, len(ids), window)]
    n, k = len(ids) // window, max(1, tokens // window)
    return [ids[(i * n // k) * window :][:window] for i in range(k)]


def forgetting(
    model: Any, tokenizer: Any, text: str, base_model: Any = None, tokens: int = REFERENCE_TOKENS
) -> Forgetting:
    """Perplexity of ``model`` on ``text`` and, with ``base_model``, mean KL(base || model) per token.

    ``reference_windows`` picks up to ``tokens`` tokens; each window is prefixed with BOS (when
    the tokenizer has one) and every token after the first of a window is scored.
    """
    import torch
    import torch.nn.functional as F

    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    device = next(model.parameters()).device
    nlls: list[float] = []  # per window: the intervals resample windows (sft.evaluation.intervals)
    kls: list[float] = []
    counts: list[int] = []
    with torch.no_grad():
        for piece in reference_windows(ids, tokens):
            window = bos + piece
            if len(window) < 2:
                continue
            x = torch.tensor([window], device=device)
            logp = F.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1].float(), dim=-1)  # [T-1, V]
            targets = x[0, 1:]
            nlls.append(-float(logp.gather(1, targets[:, None]).sum()))
            counts.append(len(window) - 1)
            if base_model is not None:
                base_logits = base_model(input_ids=x.to(next(base_model.parameters()).device), use_cache=False)
                base_logp = F.log_softmax(base_logits.logits[0, :-1].float().to(device), dim=-1)
                kls.append(float((base_logp.exp() * (base_logp - logp)).sum()))
                del base_logp
            del logp
    count = sum(counts)
    out: Forgetting = {
        "reference_perplexity": math.exp(sum(nlls) / count) if count else None,
        "reference_tokens": count,
        "window_nll": [round(v, 4) for v in nlls],
        "window_tokens": counts,
    }
    if base_model is not None:
        out["kl_to_base"] = sum(kls) / count if count else None
        out["window_kl"] = [round(v, 5) for v in kls]
    return out


def evaluate(
    cfg: Config, model: Any, tokenizer: Any, template: str, base_model: Any = None, progress: bool = True,
    split: str = "eval",
    rt: Runtime | None = None,
) -> EvalResult:
    """All eval metrics of ``model`` as one JSON-able dict (see the module docstring), on the test
    rows (``split="eval"``: eval.data and eval.split) or the dev rows (``"dev"``: eval.dev and
    eval.dev_split, what choices are made on).

    ``rt``: the process group to split the work over (``sft eval`` under torchrun); None is this
    one process (``sft.runtime.local(cfg)``).
    """
    from sft.data.chat import end_of_turn_tokens, prompt_ids, stop_strings, stop_token_ids
    from sft.data.pipeline import build_dataset, load_conversations
    from sft.data.reasoning import open_reasoning
    from sft.evaluation import tool_calls as tc
    from sft.evaluation.constraints import check
    from sft.evaluation.generate import generate_batch
    from sft.evaluation.heldout import heldout_losses
    from sft.evaluation.intervals import add_intervals, bits, row_key
    from sft.evaluation.reasoning import split_answer, strip_special
    from sft.evaluation.reference import load_reference
    from sft.evaluation.safety import make_detector, rate
    from sft.models.save import pick_pad_id

    rt = rt if rt is not None else local(cfg)
    t0 = time.perf_counter()
    refusal = make_detector(cfg.eval.refusal.phrases, cfg.eval.refusal.regex, cfg.eval.refusal.builtin)
    was_training = model.training
    model.eval()
    try:
        stop_ids = stop_token_ids(tokenizer, template)
        marker, eot = end_of_turn_tokens(tokenizer, template)
        end_ids = set(eot) if len(eot) == 1 else set(stop_ids)  # what stop_rate counts (module docstring)
        pad_id = pick_pad_id(tokenizer, stop_ids)
        convs, _ = load_conversations(cfg, split)
        items = []
        for conv in convs:
            parts = tc.call_reference(conv) if (conv.metric or cfg.eval.metric) == "tool_call" else split_reference(conv)
            if parts is not None and parts[0]:
                items.append((conv, parts[0], parts[1]))
        if cfg.eval.max_examples is not None:
            items = items[: cfg.eval.max_examples]
        if not items:
            raise SftError(
                "eval: no eval conversation ends with an assistant turn to score; set eval.data "
                "(or eval.split) to conversations whose last assistant message is the reference"
            )
        checks = constraint_checks(items, cfg.eval.metric)  # before the held-out loss and minutes of generation
        check_references(items, cfg.eval.metric)
        dataset = build_dataset(cfg, tokenizer, split)
        dropped = dataset.report.dropped_too_long
        if dropped and rt.main:  # generation still answers them: say why the loss has fewer examples
            print(f"eval loss: {dropped} of {dropped + len(dataset.examples)} eval examples are longer than "
                  f"data.max_length {cfg.data.max_length} and left out of it (generation still answers them); "
                  "raise data.max_length" + (" or set data.truncation: truncate" if cfg.data.truncation == "drop" else "")
                  + " to include them", file=sys.stderr)
        per_example = heldout_losses(model, dataset.examples, pad_id, cfg, rt)
        loss_tokens = sum(n for _, n in per_example)
        loss = sum(v for v, _ in per_example) / loss_tokens if loss_tokens else None
        prompts = [prompt_ids(msgs, tokenizer, template, tools=conv.tools) for conv, msgs, _ in items]
        texts = stop_strings(tokenizer, template)  # a marker of several text tokens: stop on its text
        with rt.autocast():  # the run's precision, as for the held-out loss (module docstring)
            gens = generate_batch(
                model, tokenizer, prompts, stop_ids, cfg.eval.max_new_tokens, cfg.eval.batch_size, progress, rt=rt,
                **({"stop_strings": texts} if texts else {}),
            )
        # reasoning models: accuracy, refusal and constraints are scored on the answer after the reasoning
        split_replies = [split_answer(g.raw or g.text, open_reasoning(tokenizer.decode(p)) is not None)
                         for g, p in zip(gens, prompts)]
        answers = [strip_special(tokenizer, a) for _, a in split_replies]
        thought = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) if r else 0 for r, _ in split_replies]
        met = [check(a, conv.constraints) if conv.constraints else None for a, (conv, _, _) in zip(answers, items)]
        tool_rows = [i for i, (conv, _, _) in enumerate(items) if (conv.metric or cfg.eval.metric) == "tool_call"]
        call_fmt = tc.call_format(tokenizer, template) if tool_rows else tc.HERMES  # the template's own format
        calls = {i: tc.score_calls(tc.parse_calls(answers[i], call_fmt), tc.expected_calls(items[i][2]))
                 for i in tool_rows}
        correct = [calls[i].call_ok if i in calls else all(m or []) if checks[i] else score(a, ref, conv.metric or cfg.eval.metric)
                   for i, (m, a, (conv, _, ref)) in enumerate(zip(met, answers, items))]
        # a plain-text marker ends a reply with stopped set and no stop id (also across ranks)
        ended = [g.stop_id in end_ids or (bool(texts) and g.stopped and g.stop_id is None) for g in gens]
        refused = {c: [refusal(a) for a, (conv, _, _) in zip(answers, items) if conv.category == c]
                   for c in ("harmful", "benign")}  # rows tagged "category" (per row or per eval source)

        by_source: dict[str, list[bool]] = {}
        for ok, (conv, _, _) in zip(correct, items):
            by_source.setdefault(Path(conv.source).name or "eval", []).append(ok)
        samples: list[Sample] = [
            {"prompt": msgs[-1].content, "reference": ref, "reply": g.text, "correct": ok, "stopped": end}
            for g, ok, end, (_, msgs, ref) in list(zip(gens, correct, ended, items))[: cfg.eval.samples]
        ]
        ref = load_reference(cfg.eval.reference)
        with rt.autocast():
            forgot = forgetting(model, tokenizer, ref.text, base_model, cfg.eval.reference_tokens)
        forgot["reference"], forgot["reference_sha256"] = ref.version, ref.sha256
        rows: Rows = {
            "key": [row_key(conv.source, conv.line) for conv, _, _ in items],
            "correct": bits(correct),
            "stopped": bits(ended),
            "category": "".join({"harmful": "h", "benign": "b"}.get(conv.category or "", "-") for conv, _, _ in items),
            "refused": bits([refusal(a) if conv.category in ("harmful", "benign") else None
                             for a, (conv, _, _) in zip(answers, items)]),
            "tokens": [len(g.token_ids) for g in gens],
        }
        if any(m is not None for m in met):  # rows with a `constraints` list, whatever their metric
            rows["constraint_rows_met"] = bits([all(m) if m is not None else None for m in met])
            rows["constraints_met"] = [sum(m) if m else 0 for m in met]
            rows["constraints_total"] = [len(m) if m else 0 for m in met]
        if calls:  # rows scored with eval.metric tool_call: "-" for the others
            for key, flag in (("tool_call_accuracy", "call_ok"), ("tool_name_accuracy", "name_ok"),
                              ("tool_call_unparseable", "unparseable")):
                rows[key] = bits([getattr(calls[i], flag) if i in calls else None  # type: ignore[literal-required]
                                  for i in range(len(items))])
        losses: Losses = {"key": [row_key(e.source, e.line) for e in dataset.examples],
                          "nll": [round(v, 4) for v, _ in per_example], "tokens": [n for _, n in per_example]}
    finally:
        model.train(was_training)
    result: EvalResult = {
        "eval_loss": loss,
        "perplexity": math.exp(loss) if loss is not None else None,
        "eval_tokens": loss_tokens,
        "task_accuracy": _mean([float(c) for c in correct]),
        "stop_rate": _mean([float(e) for e in ended]),
        "stop_token": marker,
        "refusal_rate": rate(refused["harmful"]),
        "over_refusal_rate": rate(refused["benign"]),
        "mean_response_tokens": _mean([float(len(g.token_ids)) for g in gens]),
        "mean_reasoning_tokens": _mean([float(n) for n in thought]),  # 0 for replies without reasoning
        "accuracy_by_source": {k: sum(v) / len(v) for k, v in sorted(by_source.items())},
        "forgetting": forgot,
        "samples": samples,
        "n_examples": len(items),
        "metric": cfg.eval.metric,
        "split": split,
        "precision": rt.precision,
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "rows": rows,
        "losses": losses,
    }
    if calls:
        rates = tc.tool_call_rates(list(calls.values()))
        result["tool_call_accuracy"] = rates["tool_call_accuracy"]
        result["tool_name_accuracy"] = rates["tool_name_accuracy"]
        result["tool_call_unparseable"] = rates["tool_call_unparseable"]
        # the base rate: a model that never calls is right on every row that expects no call
        result["tool_calls_expected"] = sum(1 for i in calls if tc.expected_calls(items[i][2]))
    if "constraints_total" in rows:
        listed = [m for m in met if m is not None]
        result["constraint_rows_met"] = _mean([float(all(m)) for m in listed])
        result["constraint_share_met"] = sum(map(sum, listed)) / sum(map(len, listed))
        result["constraints_by_type"] = by_type(met, [conv.constraints for conv, _, _ in items])
    return add_intervals(result)


# ---------------------------------------------------------------------------------------------
# `sft eval CONFIG [--model M] [--out FILE.json]`


def summary(result: EvalResult) -> str:
    """The readable block `sft eval` prints; each figure with its 95% interval (and n) when known."""
    from sft.reporting.report import with_interval

    data: dict[str, Any] = dict(result)
    n: dict[str, Any] = data.get("n") or {}

    def show(key: str, how: str) -> str:
        return with_interval(data, key, how)

    def count(key: str, what: str) -> str:
        return f", n={n[key]} {what}" if isinstance(n.get(key), int) else ""

    f: Forgetting = result.get("forgetting") or {}
    lines = [
        f"eval loss        {show('eval_loss', 'num4')}  (perplexity {show('perplexity', 'num2')}"
        f"{count('eval_loss', 'examples')})",
        f"task accuracy    {show('task_accuracy', 'pct')}  "
        f"({result.get('n_examples')} examples, metric {result.get('metric')})",
        f"stop rate        {show('stop_rate', 'pct')}  (replies ending with {result.get('stop_token') or 'EOS'})",
        f"response tokens  {show('mean_response_tokens', 'num1')} (mean)",
        f"reference ppl    {show('forgetting.reference_perplexity', 'num2')}",
    ]
    if result.get("mean_reasoning_tokens"):  # a reasoning model: its answers were scored after the reasoning
        lines.insert(4, f"reasoning tokens {result['mean_reasoning_tokens']:.1f} (mean; scores use the answer after it)")
    if f.get("kl_to_base") is not None:
        lines.append(f"KL to base       {show('forgetting.kl_to_base', 'num4')} nats/token")
    if result.get("tool_call_accuracy") is not None:
        lines.append(f"tool calls       {show('tool_call_accuracy', 'pct')} right call, "
                     f"{show('tool_name_accuracy', 'pct')} right function, "
                     f"{show('tool_call_unparseable', 'pct')} unparseable{count('tool_call_accuracy', 'rows')}; "
                     f"{result.get('tool_calls_expected')} of them expect a call")
    if result.get("refusal_rate") is not None:
        lines.append(f"refusal rate     {show('refusal_rate', 'pct')}  (harmful requests declined"
                     f"{count('refusal_rate', 'rows')})")
    if result.get("over_refusal_rate") is not None:
        lines.append(f"over-refusal     {show('over_refusal_rate', 'pct')}  (benign requests declined"
                     f"{count('over_refusal_rate', 'rows')})")
    if result.get("constraint_rows_met") is not None:
        lines.append(f"constraints      {show('constraint_rows_met', 'pct')} of rows met all"
                     f"{count('constraint_rows_met', 'rows')}; {show('constraint_share_met', 'pct')} of checks met")
    by_source_iv = (data.get("intervals") or {}).get("accuracy_by_source") or {}
    for k, v in (result.get("accuracy_by_source") or {}).items():
        lo_hi = by_source_iv.get(k)
        extra = f" [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]%" if lo_hi else ""
        lines.append(f"  accuracy {k}: {100 * v:.1f}%{extra}")
    lines.append("  [..]: 95% intervals (Wilson for rates, bootstrap over examples for losses)")
    return "\n".join(lines)


def evaluate_model(cfg: Config, model: str | None = None, rt: Runtime | None = None,
                   progress: bool = True) -> EvalResult:
    """Load ``model`` (a run's ``final/``, an alias or a hub ID; default ``cfg.model``) and its
    tokenizer and evaluate it on ``cfg``'s eval data. A tuned HF directory is compared with the
    config's base model (KL to base). ``rt``: the process group (None: this one process)."""
    from sft.data.chat import config_template
    from sft.models.load import load_model, load_tokenizer, resolve

    if not cfg.eval.has_test:
        raise SftError("eval.data: nothing to evaluate; set eval.data: path/to/eval.jsonl "
                       "(or eval.split: 0.05 to hold out training rows)")
    rt = rt if rt is not None else local(cfg)
    name = model or cfg.model
    revision = cfg.revision if name == cfg.model else None  # `revision:` belongs to `model:`
    tokenizer = load_tokenizer(name, trust_remote_code=cfg.trust_remote_code, revision=revision)
    template = config_template(cfg, tokenizer)
    lm = load_model(name, trust_remote_code=cfg.trust_remote_code, revision=revision).to(rt.device)
    base = None
    if model is not None and model != cfg.model and resolve(model).kind == "hf":
        # a tuned directory evaluated against the config's base model: measure drift from it
        base = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        base = base.to(rt.device)
    result = evaluate(cfg, lm, tokenizer, template, base_model=base, progress=progress and rt.main, rt=rt)
    result["model"] = name
    return result


def run_eval(cfg: Config, model: str | None = None, out: str | None = None) -> int:
    """``sft eval``: evaluate (``model`` overrides ``cfg.model``), print a summary, write JSON."""
    from sft.atomic import atomic_write_text, check_out_file

    if not cfg.eval.has_test:
        raise SftError("eval.data: nothing to evaluate; set eval.data: path/to/eval.jsonl "
                       "(or eval.split: 0.05 to hold out training rows)")
    dst = Path(out) if out else Path(cfg.output_dir) / "eval.json"
    check_out_file(dst, "--out" if out else "output_dir", "eval.json")  # before minutes of evaluation
    rt = start(cfg)  # under torchrun: loss and generation split over the ranks, rank 0 writes
    result = evaluate_model(cfg, model, rt)
    if not rt.main:
        rt.shutdown()
        return 0
    print(summary(result))
    atomic_write_text(dst, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dst}")
    rt.shutdown()
    return 0
