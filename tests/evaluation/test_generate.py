"""generate_batch: greedy, deterministic, left padding == unbatched, stop handling; the file and chat commands."""

from __future__ import annotations

import json

import pytest
import torch

from sft.evaluation.generate import chat, generate_batch, generate_file, split_at_stop

TEXTS = ["Hello there, how are you today?", "Hi", "The quick brown fox jumps over the lazy dog again and again."]
NEVER = [49151]  # a stop id the tiny model does not produce in 12 greedy steps (checked below)


def untied_llama(vocab_size: int):
    """conftest's tiny_llama ties its embeddings, so greedy decoding just repeats the last input
    token; with an untied head (and larger init) every step picks a different token, so
    padding or cache mistakes show up in the output."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval().to(torch.float32)


@pytest.fixture(scope="module")
def model(smol_tok):
    return untied_llama(len(smol_tok))


@pytest.fixture(scope="module")
def prompts(smol_tok):
    return [smol_tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def free(model, smol_tok, prompts):
    """Greedy replies of the tiny model, batched, with a stop id it never produces."""
    return generate_batch(model, smol_tok, prompts, NEVER, max_new_tokens=12, batch_size=3)


def test_deterministic_and_pinned(model, smol_tok, prompts, free):
    a = generate_batch(model, smol_tok, prompts, NEVER, max_new_tokens=12, batch_size=3)
    assert a == free
    assert free[0].token_ids == [5676, 27370, 40142, 37338, 14186, 41164, 18787, 36383, 27762, 37671, 38351, 35640]
    assert [len(g.token_ids) for g in a] == [12, 12, 12]
    assert not any(g.stopped for g in a)
    assert all(NEVER[0] not in g.token_ids for g in a)
    assert a[0].text == smol_tok.decode(a[0].token_ids, skip_special_tokens=True)


def test_left_padding_equals_unbatched(model, smol_tok, prompts, free):
    one_by_one = [generate_batch(model, smol_tok, [p], NEVER, 12, batch_size=1)[0] for p in prompts]
    assert [g.token_ids for g in free] == [g.token_ids for g in one_by_one]
    assert len({len(p) for p in prompts}) == 3  # the batch really was padded


def test_control_padding_without_mask_differs(model, smol_tok, prompts, free):
    """The control: the same left-padded batch with the padding NOT masked gives other tokens,
    so the equality above depends on the attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=12, eos_token_id=NEVER, pad_token_id=0)
    unmasked = [out[i, width:].tolist() for i in range(len(prompts))]
    assert unmasked != [g.token_ids for g in free]


def test_stopped_when_stop_id_is_forced(model, smol_tok, prompts, free):
    stop = free[0].token_ids[3]  # make the 4th generated token of prompt 0 a stop token
    got = generate_batch(model, smol_tok, prompts, [stop], 12, batch_size=3)
    assert got[0].stopped is True and got[0].stop_id == stop
    assert got[0].token_ids == free[0].token_ids[: free[0].token_ids.index(stop)]
    assert all(f.stop_id is None for f in free)  # ran to the limit: no stop token
    assert stop not in got[0].token_ids
    for g, f in zip(got[1:], free[1:]):  # the others stop only if they produce that token
        assert g.stopped == (stop in f.token_ids)


def test_head_gets_contiguous_input_with_a_frozen_head(smol_tok, prompts, free):
    """A frozen head (LoRA's merged base, train.freeze_embeddings) on a strided 3-D slice takes a
    CPU path hundreds of times slower (contiguous_head_input): generation hands it a contiguous
    input, and the replies are the same tokens."""
    model = untied_llama(len(smol_tok))
    model.lm_head.weight.requires_grad_(False)
    seen: list[bool] = []  # what the head's forward received (after every pre-hook)
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    try:
        got = generate_batch(model, smol_tok, prompts, NEVER, max_new_tokens=12, batch_size=3)
        assert [g.token_ids for g in got] == [g.token_ids for g in free]
        assert len(seen) == 12 and all(seen)  # 1 prefill + 11 decoding steps
        # control: without it, transformers hands the head a strided slice in the prefill
        seen.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor([prompts[0], prompts[0]]), logits_to_keep=1)
        assert seen == [False]
        assert not model.lm_head._forward_pre_hooks  # the hook was removed after generating
    finally:
        handle.remove()


def test_split_at_stop():
    assert split_at_stop([1, 2, 3], [3, 9]) == ([1, 2], True)
    assert split_at_stop([3], [3]) == ([], True)
    assert split_at_stop([1, 2], [3]) == ([1, 2], False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tok, model):
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(str(d), safe_serialization=True)
    smol_tok.save_pretrained(str(d))
    return d


def test_generate_file(model_dir, tmp_path, smol_tok):
    src = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}], "id": 1},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert generate_file(str(model_dir), str(src), str(out), max_new_tokens=5, batch_size=2) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got[:1]] == [1]
    assert [g["messages"] for g in got] == [r["messages"] for r in rows]
    # the responses are the greedy replies generate_batch gives for the same prompts (so a file
    # with empty, shuffled or truncated responses fails), and "stopped" is whether one ended early
    from sft.data.chat import prompt_ids, resolve_template, stop_token_ids
    from sft.data.types import Message
    from sft.models.load import load_model

    template = resolve_template("auto", smol_tok)
    model = load_model(str(model_dir))
    want = generate_batch(model, smol_tok, [prompt_ids([Message(**m) for m in r["messages"]], smol_tok, template)
                                            for r in rows], stop_token_ids(smol_tok, template), 5, batch_size=1)
    assert [g["response"] for g in got] == [w.text for w in want]
    assert [g["stopped"] for g in got] == [w.stopped for w in want]
    assert all(w.text and len(w.token_ids) == 5 for w in want)  # 5 real tokens each: not vacuous
    assert want[0].text != want[1].text


def test_generate_file_takes_the_training_formats_without_their_replies(model_dir, tmp_path, smol_tok):
    """A prompt, an Alpaca row, a ShareGPT row: each answered as its messages row is (same prompt
    tokens, same greedy reply); the output keeps each input row as it was."""
    rows = [{"prompt": "2+2?"}, {"instruction": "Add", "input": "2+2", "system": "Be brief."},
            {"conversations": [{"from": "human", "value": "2+2?"}]},
            {"messages": [{"role": "user", "content": "2+2?"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add\n2+2"}]}]
    src, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert generate_file(str(model_dir), str(src), str(out), max_new_tokens=5, batch_size=1) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k not in ("response", "stopped")} for g in got] == rows
    replies = [g["response"] for g in got]
    assert replies[0] == replies[2] == replies[3] and replies[1] == replies[4]
    assert replies[0] != replies[1]  # control: another prompt, another reply
    as_json = tmp_path / "p.json"  # a JSON array, as LLaMA-Factory's files are: read as training reads it
    as_json.write_text(json.dumps(rows, indent=1))
    assert generate_file(str(model_dir), str(as_json), str(out), max_new_tokens=5, batch_size=1) == 0
    assert [json.loads(line)["response"] for line in out.read_text().splitlines()] == replies


def test_generate_file_bad_row(model_dir, tmp_path):
    from sft.errors import SftError

    src = tmp_path / "p.jsonl"
    src.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(SftError, match=r"p.jsonl:1: messages\[0\]"):
        generate_file(str(model_dir), str(src), str(tmp_path / "o.jsonl"))
    src.write_text('{"question": "x"}\n{"instruction": ""}\n')
    with pytest.raises(SftError, match=r"(?s)p.jsonl:1: row keys are \['question'\]; write .*"
                                       r"p.jsonl:2: instruction is empty"):
        generate_file(str(model_dir), str(src), str(tmp_path / "o.jsonl"))


def test_chat_commands_and_eof(model_dir, monkeypatch, capsys):
    lines = iter(["hello", "/system Be brief.", "hi again", "/reset", "/nope", "again"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert chat(str(model_dir), max_new_tokens=4) == 0
    out = capsys.readouterr().out
    assert out.count("bot> ") == 3
    assert "system prompt set" in out and "conversation reset" in out and "unknown command /nope" in out
