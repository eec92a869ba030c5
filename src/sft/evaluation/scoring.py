"""``sft data score``: how a model sees each trained reply (the scores ``data.select`` uses).

For every trained reply (a run of trained labels; the template's end-of-turn marker at its end is
not part of the reply), with the scorer model:

- ``loss``: mean token NLL of the reply tokens given everything before them (the prompt);
- ``loss_alone``: the same reply tokens after only a neutral header: the template's reply header
  (its generation prompt, e.g. ``<|im_start|>assistant\\n``, after BOS where the template writes one),
  as Cherry LLM scores the output after ``### Response:`` (tianyi-lab/Cherry_LLM, data_analysis.py);
- ``ifd = loss / loss_alone``: above 1 the prompt makes the reply less likely (a mismatched pair);
- ``eot_prob``: the probability of the end-of-turn marker tokens right after the reply (the product
  over a plain-text marker's tokens); low means the model would go on (an unfinished reply).

Sequences are sorted by length and right-padded into batches of at most ``batch_tokens`` tokens;
log-probabilities are taken only at the scored positions (never a [B, T, vocab] tensor). Under
torchrun each rank scores every world-th example and rank 0 writes. The scores are cached beside
the tokenized data (``sft.data.select.scores_path``), keyed on the data, the scorer and this code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sft import runtime
from sft.config import Config
from sft.data.types import IGNORE, Example
from sft.errors import SftError
from sft.runtime import Runtime

BATCH_TOKENS = 8192  # padded tokens per forward pass (fp32 activations of a 135M model: ~1 GB)
LOGIT_ROWS = 1024  # scored positions per vocabulary projection ([1024, 49152] fp32: 200 MB)


def reply_spans(labels: list[int], eot: list[int], ids: list[int]) -> list[tuple[int, int, int]]:
    """(start, reply_end, end) of each run of trained labels; ``[reply_end, end)`` is the
    end-of-turn marker ``eot`` when the run ends with it (else reply_end == end: cut by truncation).

    >>> reply_spans([-100, -100, 5, 6, 9, -100, 7, 9], [9], [1, 2, 5, 6, 9, 3, 7, 9])
    [(2, 4, 5), (6, 7, 8)]
    >>> reply_spans([-100, 5, 6], [9], [1, 5, 6])
    [(1, 3, 3)]
    """
    out = []
    i = 0
    while i < len(labels):
        if labels[i] == IGNORE:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] != IGNORE:
            j += 1
        n = len(eot)
        ends = n > 0 and j - i >= n and ids[j - n : j] == eot
        out.append((i, j - n if ends else j, j))
        i = j
    return out


def reply_header(tokenizer: Any, template: str) -> list[int]:
    """The template's reply header: what ``add_generation_prompt`` appends to a conversation,
    after BOS when the template starts the text with it. SmolLM2: ``<|im_start|>assistant\\n``;
    Gemma: ``<bos><start_of_turn>model\\n``."""
    from sft.data.masks import render, tokenize

    probe = [{"role": "user", "content": "Hi"}]
    before = render(tokenizer, template, probe, None, False, "data.template")
    after = render(tokenizer, template, probe, None, True, "data.template")
    if not after.startswith(before) or after == before:
        raise SftError("data.template: its generation prompt does not extend the rendered conversation, so it "
                       "has no reply header to score replies alone with; use chatml, gemma or llama3")
    gen, bos = after[len(before):], getattr(tokenizer, "bos_token", None)
    # Gemma's <bos> opens the text, not a turn; SmolLM2's "bos" <|im_start|> opens every turn
    lead = bos if isinstance(bos, str) and bos and before.startswith(bos) and not gen.startswith(bos) else ""
    return tokenize(tokenizer, lead + gen)[0]


@dataclasses.dataclass
class Job:
    """One sequence to run and the positions whose token log-probability is wanted."""

    ids: list[int]
    positions: list[int]  # t: log p(ids[t] | ids[:t]); t >= 1
    out: list[float] = dataclasses.field(default_factory=list)


def token_logprobs(model: Any, jobs: list[Job], dev: torch.device, batch_tokens: int = BATCH_TOKENS,
                   progress: Any = None) -> None:
    """Fill each job's ``out`` with the log-probabilities at its positions (fp32)."""
    from sft.lm.loss import unwrap

    lm = unwrap(model)
    weight = lm.get_output_embeddings().weight  # [V, H]
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    pad = 0
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].ids))  # long first: similar lengths pad little
    i = 0
    while i < len(order):
        width = len(jobs[order[i]].ids)
        size = max(1, batch_tokens // max(1, width))
        batch = [jobs[k] for k in order[i : i + size]]
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, job in enumerate(batch):
            ids[b, : len(job.ids)] = torch.tensor(job.ids)
            mask[b, : len(job.ids)] = 1
        with torch.no_grad():
            hidden = lm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
            rows = torch.tensor([b for b, job in enumerate(batch) for _ in job.positions], dtype=torch.long)
            cols = torch.tensor([t - 1 for job in batch for t in job.positions], dtype=torch.long)
            targets = ids[rows, cols + 1].to(dev)
            picked = hidden[rows.to(dev), cols.to(dev)]  # [N, H]: the states that predict the scored tokens
            lp = []
            for a in range(0, len(rows), LOGIT_ROWS):
                logits = picked[a : a + LOGIT_ROWS].float() @ weight.float().T  # [n, V]
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                lp.append(torch.log_softmax(logits, dim=-1).gather(1, targets[a : a + LOGIT_ROWS, None])[:, 0])
            flat = torch.cat(lp).tolist() if lp else []
        k = 0
        for job in batch:
            job.out = flat[k : k + len(job.positions)]
            k += len(job.positions)
        i += len(batch)
        if progress is not None:
            progress(sum(len(j.ids) for j in batch))


def _snippet(text: str, head: int = 60, tail: int = 30) -> str:
    """The start and the end of a reply (where a mismatch and a cut show).

    >>> _snippet("abcdefghij", head=3, tail=2)
    'abc … ij'
    """
    text = " ".join(text.split())
    return text if len(text) <= head + tail + 3 else f"{text[:head]} … {text[-tail:]}"


def score_examples(model: Any, tokenizer: Any, examples: list[Example], header: list[int], eot: list[int],
                   dev: torch.device, batch_tokens: int = BATCH_TOKENS, progress: Any = None) -> list[dict[str, Any]]:
    """One score per trained reply of ``examples``, in order (fields in ``sft.data.select``)."""
    jobs: list[tuple[int, int, tuple[int, int, int], Job, Job]] = []  # (example, turn, span, given prompt, alone)
    for e, ex in enumerate(examples):
        for turn, (start, reply_end, end) in enumerate(reply_spans(ex.labels, eot, ex.input_ids)):
            given = Job(ex.input_ids[:end], list(range(start, end)))
            alone = Job(header + ex.input_ids[start:reply_end], list(range(len(header), len(header) + reply_end - start)))
            jobs.append((e, turn, (start, reply_end, end), given, alone))
    token_logprobs(model, [j for _, _, _, g, a in jobs for j in (g, a)], dev, batch_tokens, progress)
    out = []
    turns: dict[tuple[str, int], int] = {}  # a row's replies are numbered across its examples
    for e, _, (start, reply_end, end), given, alone in jobs:
        ex, n = examples[e], reply_end - start
        turn = turns[(ex.source, ex.line)] = turns.get((ex.source, ex.line), -1) + 1
        loss = -sum(given.out[:n]) / n if n else None
        loss_alone = -sum(alone.out) / n if n else None
        ifd = loss / loss_alone if loss is not None and loss_alone else None
        eot_prob = math.exp(sum(given.out[n:])) if end > reply_end else None
        out.append({
            "row": f"{ex.source}:{ex.line}", "source": ex.source, "line": ex.line, "turn": turn, "reply_tokens": n,
            "loss": loss, "loss_alone": loss_alone, "ifd": ifd, "eot_prob": eot_prob,
            "text": _snippet(tokenizer.decode(ex.input_ids[start:reply_end])),
        })
    return out


class Progress:
    """``scoring 1200/5000 tokens | 850 tok/s | eta 0m05s`` on stderr, at most every 2 seconds."""

    def __init__(self, total: int, label: str = "scoring") -> None:
        self.total, self.done, self.label = total, 0, label
        self.start = self.last = time.monotonic()

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        now = time.monotonic()
        if now - self.last < 2.0 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(1e-9, now - self.start)
        eta = (self.total - self.done) / max(1e-9, rate)
        print(f"{self.label} {self.done}/{self.total} tokens | {rate:.0f} tok/s | eta {int(eta // 60)}m{int(eta % 60):02d}s",
              file=sys.stderr, flush=True)


def _distinct(examples: Sequence[Example]) -> list[Example]:
    """Each example once (weighting repeats rows; a repeat scores the same)."""
    seen: dict[tuple[str, int, Any], Example] = {}
    for ex in examples:
        seen.setdefault((ex.source, ex.line, ex.meta.get("turn")), ex)
    return list(seen.values())


def compute_scores(cfg: Config, scorer: str | None = None, use_cache: bool = True,
                   batch_tokens: int = BATCH_TOKENS, rt: Runtime | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The reply scores of ``cfg``'s training data by ``scorer`` (default ``model``): read from the
    cache, or computed (every rank its share under torchrun) and cached. Every rank returns them.
    ``rt``: the process group (None: join torchrun's, if any, with ``sft.runtime.start``)."""
    from sft.data.chat import config_template, end_of_turn_tokens
    from sft.data.pipeline import build_dataset
    from sft.data.select import read_scores, scores_path
    from sft.models.load import load_model, load_tokenizer

    if cfg.data.train_on == "all":
        raise SftError("data.train_on: all trains the prompts too, so a reply has no prompt to score it with; "
                       "score with --data.train_on=assistant")
    name = scorer or cfg.model
    revision = cfg.revision if name == cfg.model else None
    plain = dataclasses.replace(cfg, model=name, revision=revision, data=dataclasses.replace(cfg.data, select=None))
    tok = load_tokenizer(name, trust_remote_code=cfg.trust_remote_code, revision=revision)
    path = scores_path(cfg, name, tok)
    if use_cache and path.is_file():
        print(f"scores: cached {path}", file=sys.stderr)
        return path, read_scores(path)
    template = config_template(cfg, tok)
    examples = _distinct(build_dataset(plain, tok, "train").examples)
    marker, eot = end_of_turn_tokens(tok, template)
    if not marker:
        raise SftError("data.template: it writes no end-of-turn marker after a reply, so there is no end-of-turn "
                       "probability to score; use a chat template (chatml, gemma, llama3)")
    header = reply_header(tok, template)
    rt = rt if rt is not None else runtime.start(cfg)
    rank, world, dev = rt.rank, rt.world, rt.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = load_model(name, dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=revision).to(dev).eval()
    rows = {k: i for i, k in enumerate(dict.fromkeys((ex.source, ex.line) for ex in examples))}
    mine = [ex for ex in examples if rows[(ex.source, ex.line)] % world == rank]  # whole rows per rank
    total = sum(2 * len(ex) for ex in mine)  # each reply twice: given its prompt, and alone
    scores = score_examples(model, tok, mine, header, eot, dev, batch_tokens,
                            Progress(total) if rank == 0 else None)
    if world > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, scores)
        scores = sorted((s for p in parts for s in p), key=lambda s: (rows[(s["source"], s["line"])], s["turn"]))
    if rank == 0:
        from sft.atomic import atomic_write_text

        atomic_write_text(path, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in scores))
    rt.barrier()
    return path, scores


def run_score(cfg: Config, scorer: str | None = None, out: str | None = None) -> int:
    """``sft data score``: compute (or read the cached) scores, write ``--out``, print a summary."""
    from sft.data.select import format_summary, score_summary

    if out:
        from sft.atomic import check_out_file

        check_out_file(out, "--out", "scores.jsonl")
    rt = runtime.start(cfg)
    path, scores = compute_scores(cfg, scorer, rt=rt)
    if not rt.main:
        return 0
    if out:
        from sft.atomic import atomic_write_text

        atomic_write_text(Path(out), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in scores))
    print(format_summary(score_summary(scores)))
    print(f"wrote {len(scores)} reply scores to {out or path}" + (f" (cached in {path})" if out else ""), file=sys.stderr)
    return 0
