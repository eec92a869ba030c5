"""Greedy generation: batched for evaluation and files, streamed for the terminal chat.

Prompts arrive as token ids (rendered by ``sft.data.chat.prompt_ids``), so generation never
re-renders a template and evaluation sees exactly the tokens training saw.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft.data.types import Message
from sft.errors import SftError
from sft.evaluation.reasoning import ChatView, cut_at_text, split_answer, strip_special

if TYPE_CHECKING:
    from sft.runtime import Runtime


@dataclass
class Generation:
    text: str  # decoded reply, without the stop token and without special tokens
    token_ids: list[int]  # the generated ids, without the stop token
    stopped: bool  # ended with a stop token before max_new_tokens
    stop_id: int | None = None  # the stop token that ended it (end-of-turn or EOS); None if it ran out
    stop_text: str | None = None  # the plain-text end-of-turn marker that ended it (then stop_id is None)
    raw: str = ""  # decoded WITH special tokens (a reasoning model's [THINK] or channel tags); "": as text


def split_at_stop(new_ids: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """Cut generated ids at the first stop id (which is dropped).

    >>> split_at_stop([5, 6, 2, 0, 0], stop_ids=[2])
    ([5, 6], True)
    >>> split_at_stop([5, 6, 7], stop_ids=[2])
    ([5, 6, 7], False)
    """
    stops = set(stop_ids)
    for i, t in enumerate(new_ids):
        if t in stops:
            return new_ids[:i], True
    return new_ids, False


SHORT_PROMPT = 256  # tokens: prompts this long batch by count alone (length_batches)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so left padding stays small:
    at most ``batch_size`` prompts, and at most ``batch_size`` x twice the median length (or x
    ``SHORT_PROMPT`` tokens, if more) in padded tokens, so a few long prompts go in small batches
    (alone if need be) instead of padding seven short ones to their length (one 5,845-token prompt
    among twelve of 237-1,179 made a batch of 8 x 5,845: 160 of 200 s of an `sft eval`, in
    attention). Prompts up to ``SHORT_PROMPT`` tokens cost little padded, and batch as before.

    >>> length_batches([3, 9, 1, 7], batch_size=2)
    [[1, 3], [0, 2]]
    >>> length_batches([300] * 5 + [5000, 700], batch_size=4)
    [[5], [6, 0, 1], [2, 3, 4]]
    >>> length_batches([20] * 5 + [200, 70], batch_size=4)  # all short: batch_size each
    [[5, 6, 0, 1], [2, 3, 4]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    budget = batch_size * max(2 * sorted(lengths)[len(lengths) // 2], SHORT_PROMPT) if lengths else 0
    out: list[list[int]] = []
    for i in order:
        batch = out[-1] if out else None
        if batch is None or len(batch) == batch_size or (len(batch) + 1) * lengths[batch[0]] > budget:
            out.append([i])
        else:
            batch.append(i)
    return out


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    stop_ids: list[int],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
    stop_strings: list[str] | None = None,
    rt: Runtime | None = None,
) -> list[Generation]:
    """Greedy replies to ``prompts`` (token ids), in input order, cut at a stop id or at one of
    ``stop_strings`` (a plain-text end-of-turn marker, chat.stop_strings). Under torchrun (``rt`` of
    several ranks) rank r answers prompts r, r + world, ... and every rank gets all the replies
    (greedy decoding of a prompt does not depend on the others, so the result equals one
    process's); without ``rt`` this process answers them all."""
    rank, world = (rt.rank, rt.world) if rt is not None else (0, 1)
    if world == 1:
        return _generate_local(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size, progress,
                               stop_strings)
    mine = _generate_local(model, tokenizer, prompts[rank::world], stop_ids, max_new_tokens, batch_size,
                           progress and rank == 0, stop_strings)
    out: list[Generation | None] = [None] * len(prompts)
    for r, gens in enumerate(_gather_generations(mine, world, next(model.parameters()).device)):
        for k, (ids, stopped, stop_id) in enumerate(gens):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            raw = tokenizer.decode(ids, skip_special_tokens=False)
            out[r + k * world] = Generation(text, ids, stopped, stop_id, raw=raw)
    return [g for g in out if g is not None]


def _gather_generations(
    mine: list[Generation], world: int, device: Any
) -> list[list[tuple[list[int], bool, int | None]]]:
    """Every rank's (ids, stopped, stop id) replies, via one all_gather of padded int64 tensors:
    per reply ``[stopped, stop_id or -1, n, id_1 .. id_n]``."""
    import torch
    import torch.distributed as dist

    flat: list[int] = []
    for g in mine:
        stop_id = getattr(g, "stop_id", None)
        flat += [int(g.stopped), -1 if stop_id is None else stop_id, len(g.token_ids), *g.token_ids]
    size = torch.tensor([len(flat)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    width = max(int(s) for s in sizes)
    local = torch.full((width,), -1, dtype=torch.long, device=device)
    local[: len(flat)] = torch.tensor(flat, dtype=torch.long)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    result = []
    for part, n in zip(parts, sizes):
        vals, gens, i = part[: int(n)].tolist(), [], 0
        while i < len(vals):
            stopped, stop_id, length = vals[i], vals[i + 1], vals[i + 2]
            gens.append((vals[i + 3 : i + 3 + length], bool(stopped), None if stop_id < 0 else stop_id))
            i += 3 + length
        result.append(gens)
    return result


@contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Hand the output head (``lm_head``) a contiguous input while generating.

    transformers computes the prefill's logits from a slice of the hidden states
    (``hidden[:, -1:, :]``: not contiguous when the batch has several rows). PyTorch 2.13's CPU
    ``F.linear`` on such a 3-D slice is hundreds of times slower when the weight does not require
    grad (a frozen head: LoRA's merged base, ``train.freeze_embeddings``): 9.3 s instead of 21 ms
    for 16 x 1 x 640 against Gemma's 262k x 640 bf16 head on the 2-core AMD EPYC (avx512_bf16),
    where the same 16 rows made contiguous take 21 ms (``bench/frozen_head_linear.py``,
    bench/RESULTS.md). Issue 20: the tuned demo model generated ~10x slower in the training process
    than the same ``final/`` loaded fresh (its weights require grad).
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def contiguous(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    handle = head.register_forward_pre_hook(contiguous)
    try:
        yield
    finally:
        handle.remove()


def _generate_local(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    stop_ids: list[int],
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
    stop_strings: list[str] | None = None,
) -> list[Generation]:
    """Greedy replies to ``prompts`` (token ids) on this process, in input order.

    Batches are LEFT padded with an attention mask, so every prompt ends at the same position
    and the KV cache continues all of them together. The result is unbatched greedy decoding up to
    floating-point summation order, which depends on the batch's shape: where two tokens nearly tie,
    a reply can change with the prompts beside it (tests/evaluation/test_generate.py checks equality
    on a tiny model; on 13 glaive prompts with SmolLM2, 2 replies differed in their tails between
    two batchings, bench/RESULTS.md). The batches depend only on the prompts' lengths, so a
    before/after pair and reruns see the same ones.
    """
    import torch
    from transformers import GenerationConfig

    if not stop_ids:
        raise SftError("generate: no stop ids; pass the template's end-of-turn ids (chat.stop_token_ids)")
    if any(len(p) == 0 for p in prompts):
        raise SftError("generate: an empty prompt; every prompt needs at least one token")
    from sft.models.save import pick_pad_id

    pad = pick_pad_id(tokenizer, stop_ids)
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad,
        use_cache=True,
        stop_strings=stop_strings or None,  # several text tokens: stopped on the decoded text
    )
    device = next(model.parameters()).device
    batches = length_batches([len(p) for p in prompts], max(1, batch_size))
    out: list[Generation | None] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", leave=False)
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            width = max(len(prompts[i]) for i in idx)
            # (batch, width): pad on the left, mask the padding out
            ids = [[pad] * (width - len(prompts[i])) + prompts[i] for i in idx]
            mask = [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx]
            input_ids = torch.tensor(ids, dtype=torch.long, device=device)
            attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
            with torch.no_grad(), contiguous_head_input(model):
                seqs = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                                      tokenizer=tokenizer if stop_strings else None)
            for row, i in enumerate(idx):
                new = seqs[row, width:].tolist()
                kept, stopped = split_at_stop(new, stop_ids)
                kept, marker = cut_at_text(tokenizer, kept, stop_strings or [])
                text = tokenizer.decode(kept, skip_special_tokens=True)
                stop_id = new[len(kept)] if stopped and marker is None else None
                raw = tokenizer.decode(kept, skip_special_tokens=False)
                out[i] = Generation(text, kept, stopped or marker is not None, stop_id, marker, raw)
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return [g for g in out if g is not None]


# ---------------------------------------------------------------------------------------------
# `sft generate` and `sft chat`: a model directory (or alias) and its saved chat template


def _load(model_path: str, template_arg: str | None = None) -> tuple[Any, Any, str, list[int]]:
    """Model, tokenizer, template and stop ids of ``model_path`` (a run's final/ dir or an alias);
    ``template_arg`` (--template) overrides the saved template, e.g. for a base model."""
    from sft.data.chat import resolve_template, stop_token_ids
    from sft.models.load import load_model, load_tokenizer
    from sft.runtime import this_device

    tokenizer = load_tokenizer(model_path)
    template, base_dir = (template_arg, ".") if template_arg else _saved_template(model_path, tokenizer)
    template = resolve_template(template, tokenizer, base_dir=base_dir)
    model = load_model(model_path).to(this_device()).eval()  # the GPU when there is one
    return model, tokenizer, template, stop_token_ids(tokenizer, template)


def _saved_template(model_path: str, tokenizer: Any) -> tuple[str, str]:
    """The template the model was trained with, and the folder a template path is relative to:
    the tokenizer's saved chat template, else the ``data.template`` of a run config next to the
    model, else ``auto``."""
    if getattr(tokenizer, "chat_template", None):
        return "auto", "."
    here = Path(model_path)
    for cfg_file in (here / "config.yaml", here.parent / "config.yaml"):
        if cfg_file.is_file():
            import yaml

            data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
            template = (data.get("data") or {}).get("template")
            if isinstance(template, str):
                return template, str(data.get("base_dir") or ".")
    return "auto", "."


def _messages(row: Any, where: str) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """A prompt row's messages and tools, or an SftError naming ``where`` and every problem."""
    from sft.data.formats import parse_prompt

    conv, problems = parse_prompt(row)
    if conv is None:
        raise SftError("\n".join(f"{where}: {p}" for p in problems))
    return conv.messages, conv.tools


def generate_file(
    model_path: str, prompts: str, out: str, max_new_tokens: int = 256, batch_size: int = 8,
    template: str | None = None,
) -> int:
    """`sft generate MODEL --prompts FILE.jsonl --out FILE.jsonl`: answer after each conversation's
    last message; each output line is the input row plus "response" and "stopped"."""
    from sft.atomic import atomic_open, check_out_file
    from sft.data.chat import prompt_ids
    from sft.data.sources import read_file

    src, dst = Path(prompts), Path(out)
    if not src.is_file():
        raise SftError(f"{src}: prompts file not found; pass a JSONL (or JSON, CSV, Parquet) file of "
                      "{\"messages\": [...]} (or \"prompt\", \"instruction\", \"conversations\") rows")
    check_out_file(dst, "--out", "replies.jsonl")  # before the model loads and generates
    rows: list[dict[str, Any]] = []
    convs: list[tuple[list[Message], list[dict[str, Any]] | None]] = []
    problems: list[str] = []
    for rec in read_file(src):  # the training data's readers (JSONL, JSON, CSV, Parquet): BOM, CRLF, bad bytes
        try:
            if rec.error is not None:
                raise SftError(f"{src}:{rec.line}: {rec.error}")
            convs.append(_messages(rec.value, f"{src}:{rec.line}"))
            rows.append(rec.value)
        except SftError as e:
            problems.append(str(e))
    if problems:
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SftError(f"{len(problems)} unusable prompt row(s):\n" + "\n".join(problems[:20]) + more)
    from sft.data.chat import stop_strings

    model, tokenizer, template, stop_ids = _load(model_path, template)
    ids = [prompt_ids(msgs, tokenizer, template, tools=tools) for msgs, tools in convs]
    gens = generate_batch(model, tokenizer, ids, stop_ids, max_new_tokens, batch_size, progress=True,
                          stop_strings=stop_strings(tokenizer, template))
    with atomic_open(dst) as f:
        for row, g in zip(rows, gens):
            f.write(json.dumps({**row, "response": g.text, "stopped": g.stopped}, ensure_ascii=False) + "\n")
    stopped = sum(g.stopped for g in gens)
    print(f"wrote {len(gens)} responses to {dst} ({stopped}/{len(gens)} stopped on their own)")
    return 0


CHAT_HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /quit (or Ctrl-D)"


def chat(model_path: str, max_new_tokens: int = 512, template: str | None = None, hide_reasoning: bool = False) -> int:
    """`sft chat MODEL`: a multi-turn terminal chat that streams the reply as it is generated, the
    reasoning of a reasoning model dimmed apart from the answer (``hide_reasoning``: not shown)."""
    import torch
    from transformers import TextStreamer

    from sft.data.chat import prompt_ids, stop_strings
    from sft.data.reasoning import open_reasoning
    from sft.models.save import pick_pad_id

    model, tokenizer, template, stop_ids = _load(model_path, template)
    pad = pick_pad_id(tokenizer, stop_ids)
    texts = stop_strings(tokenizer, template)

    class Stream(TextStreamer):  # decoded pieces -> the chat view (reasoning apart, stop markers cut)
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            view.feed(text)
    system: str | None = None
    history: list[Message] = []
    print(f"chatting with {model_path}; {CHAT_HELP}")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if text.startswith("/system"):
            system = text[len("/system") :].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)")
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {CHAT_HELP}")
            continue
        history.append(Message(role="user", content=line))
        msgs = ([Message(role="system", content=system)] if system else []) + history
        ids = prompt_ids(msgs, tokenizer, template)
        opened = open_reasoning(tokenizer.decode(ids)) is not None
        view = ChatView([*texts, *(tokenizer.decode([i]) for i in stop_ids)], opened, hide_reasoning)
        streamer = Stream(tokenizer, skip_prompt=True, skip_special_tokens=False)
        print("bot> ", end="", flush=True)
        dev = next(model.parameters()).device
        with torch.no_grad():
            seq = model.generate(
                input_ids=torch.tensor([ids], device=dev),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=pad,
                streamer=streamer,
                stop_strings=texts or None,
                tokenizer=tokenizer if texts else None,
            )
        view.close()
        kept, _ = split_at_stop(seq[0, len(ids) :].tolist(), stop_ids)
        kept, _ = cut_at_text(tokenizer, kept, texts)
        reasoning, reply = split_answer(tokenizer.decode(kept, skip_special_tokens=False), opened)
        reply = strip_special(tokenizer, reply)
        # the next prompt shows this turn without its reasoning, as training's history did (data.reasoning)
        history.append(Message(role="assistant", content=reply, reasoning=reasoning))
